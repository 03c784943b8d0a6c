"""The installable C library: `cmake --install` into a prefix, then examples/generate.c built
against it with find_package(EdgeMoE) (shared and static) and with pkg-config, each generating
the same greedy tokens as the Python Session on a compiled artifact."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import PROMPTS, REPO

N_NEW = 24


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed ({proc.returncode})\n{proc.stdout}\n{proc.stderr}"
    return proc


def _libdir(prefix: Path) -> Path:
    """Where GNUInstallDirs put the libraries: lib, lib64 or lib/<multiarch>."""
    found = sorted(prefix.glob("lib*/libedgemoe.so")) + sorted(prefix.glob("lib/*/libedgemoe.so"))
    assert found, f"no libedgemoe.so under {prefix}: {sorted(p.relative_to(prefix) for p in prefix.rglob('*'))}"
    return found[0].parent


@pytest.fixture(scope="module")
def prefix(tmp_path_factory) -> Path:
    """The repository configured, built and installed into a fresh prefix."""
    tmp = tmp_path_factory.mktemp("install")
    build, prefix = tmp / "build", tmp / "prefix"
    _run(["cmake", "-S", REPO, "-B", build, "-DCMAKE_BUILD_TYPE=Release"])
    _run(["cmake", "--build", build, "-j", os.cpu_count() or 1])
    _run(["cmake", "--install", build, "--prefix", prefix])
    return prefix


def _generate(exe: Path, artifact: Path, prompt: list[int], env=None) -> tuple[list[int], str]:
    proc = _run([exe, artifact, "-n", N_NEW, "-p", ",".join(map(str, prompt))], env=env)
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and "expert_hits=" in lines[1] and "expert_misses=" in lines[1], proc.stdout
    return [int(t) for t in lines[0].split()], lines[1]


@pytest.fixture(scope="module")
def expected(artifact_int4, tokenizer) -> tuple[list[int], list[int]]:
    from edgemoe.runtime import Session

    prompt = tokenizer.encode(PROMPTS[0]).ids
    with Session(artifact_int4) as s:
        return prompt, s.generate(prompt, N_NEW)


def test_install_layout(prefix):
    libdir = _libdir(prefix)
    for rel in ("include/edgemoe.h", "bin/edgemoe_run"):
        assert (prefix / rel).is_file(), rel
    assert (libdir / "libedgemoe.a").is_file()
    cmake_dir = libdir / "cmake" / "EdgeMoE"
    for name in ("EdgeMoEConfig.cmake", "EdgeMoEConfigVersion.cmake", "EdgeMoETargets.cmake"):
        assert (cmake_dir / name).is_file(), name
    targets = (cmake_dir / "EdgeMoETargets.cmake").read_text()
    for t in ("EdgeMoE::edgemoe ", "EdgeMoE::edgemoe_static", "EdgeMoE::edgemoe_run"):
        assert t in targets, t
    assert str(REPO) not in targets, "the exported targets point into the source tree"
    assert (libdir / "pkgconfig" / "edgemoe.pc").is_file()


@pytest.mark.parametrize("static", [False, True], ids=["shared", "static"])
def test_example_find_package(prefix, artifact_int4, expected, tmp_path, static):
    build = tmp_path / "examples"
    _run(["cmake", "-S", REPO / "examples", "-B", build, f"-DCMAKE_PREFIX_PATH={prefix}",
          f"-DEDGEMOE_STATIC={'ON' if static else 'OFF'}", "-DCMAKE_BUILD_TYPE=Release"])
    _run(["cmake", "--build", build])
    exe = build / "generate"
    needed = _run(["readelf", "-d", exe]).stdout if shutil.which("readelf") else None
    if needed is not None:
        assert ("libedgemoe.so" in needed) != static, needed
    prompt, want = expected
    got, stats = _generate(exe, artifact_int4, prompt)
    assert got == want, (got, want, stats)


def test_example_pkg_config(prefix, artifact_int4, expected, tmp_path):
    """The one-line cc command of examples/README.md, against a copy of the prefix elsewhere
    (edgemoe.pc and the CMake files locate the prefix relative to themselves)."""
    if not shutil.which("pkg-config"):
        pytest.fail("pkg-config is not installed: apt-get install pkg-config (scripts/setup-dev.sh does)")
    moved = tmp_path / "moved-prefix"
    shutil.copytree(prefix, moved, symlinks=True)
    libdir = _libdir(moved)
    env = dict(os.environ, PKG_CONFIG_PATH=str(libdir / "pkgconfig"))
    flags = _run(["pkg-config", "--cflags", "--libs", "edgemoe"], env=env).stdout.split()
    assert "-ledgemoe" in flags and any(f.startswith("-I") for f in flags), flags
    assert Path(_run(["pkg-config", "--variable=libdir", "edgemoe"], env=env).stdout.strip()).resolve() == libdir
    exe = tmp_path / "generate"
    cc = os.environ.get("CC", "cc")
    _run([cc, "-O2", REPO / "examples" / "generate.c", *flags, f"-Wl,-rpath,{libdir}", "-o", exe], env=env)
    prompt, want = expected
    got, _ = _generate(exe, artifact_int4, prompt)
    assert got == want
