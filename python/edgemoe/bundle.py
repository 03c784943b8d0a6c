"""Deploy bundles: one tar.gz per target holding everything a board needs to run a compiled model,
and nothing it needs from elsewhere but its C library:

    <name>/model/            the artifact (manifest.json, trunk.bin, experts.bin, kernels.so, tokenizer)
    <name>/bin/edgemoe_run   the C CLI, built for the target (the runtime linked in statically)
    <name>/lib/libedgemoe.so, libedgemoe.a, cmake/EdgeMoE, pkgconfig   the runtime, to link an app against
    <name>/include/edgemoe.h
    <name>/run.sh            runs edgemoe_run on the bundled model: ./run.sh --prompt "..." -n 64
    <name>/bundle.json       target, compile id, runtime build, every file's size and SHA-256

The runtime is configured with the target's toolchain (targets/toolchain.py: the Debian cross
compiler for Linux boards, the NDK's android.toolchain.cmake for Android), built and installed
into a staging prefix with CMake; the archive is written beside its final name and renamed into
place when complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from .runtime import REPO_ROOT
from .targets import TargetDesc, load_target, toolchain

BUNDLE_FORMAT = "edgemoe-bundle"
BUNDLE_VERSION = 1
# EDGEMOE_EMULATOR lets a bundle for another architecture be tried on a PC (qemu-user).
RUN_SCRIPT = """#!{shell}
# Generates with the bundled model: ./run.sh --prompt "ROMEO:" -n 64 (edgemoe_run --help: every option).
# To try a bundle for another architecture on a PC: EDGEMOE_EMULATOR="qemu-aarch64 -L /usr/aarch64-linux-gnu" ./run.sh ...
here=$(cd "$(dirname "$0")" && pwd)
exec $EDGEMOE_EMULATOR "$here/bin/edgemoe_run" "$here/model" "$@"
"""
SHELLS = {"linux": "/bin/sh", "android": "/system/bin/sh"}


class BundleError(RuntimeError):
    pass


def runtime_commands(target: TargetDesc, build_dir: Path, prefix: Path) -> list[list[str]]:
    """The CMake commands that configure, build and install the runtime for `target` into `prefix`."""
    configure = ["cmake", "-S", str(REPO_ROOT), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                 "-DCMAKE_INSTALL_LIBDIR=lib", *toolchain.cmake_cross_args(target)]
    return [configure,
            ["cmake", "--build", str(build_dir), "-j", str(os.cpu_count() or 1), "--target", "edgemoe",
             "edgemoe_static", "edgemoe_run"],
            ["cmake", "--install", str(build_dir), "--prefix", str(prefix)]]


def build_runtime_for(target: TargetDesc, build_dir: Path, prefix: Path) -> None:
    if not (REPO_ROOT / "CMakeLists.txt").is_file():
        raise BundleError(f"the runtime's sources are not here ({REPO_ROOT}): package from a source checkout")
    toolchain.require_program("cmake", "the runtime's build tool")
    for cmd in runtime_commands(target, build_dir, prefix):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise BundleError(f"building the runtime for {target.name} failed: {' '.join(cmd)}\n"
                              f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def package(artifact: Path, out: Path, target_name: str | None = None, android_api: int | None = None,
            build_root: Path | None = None, log=print) -> Path:
    """Writes the bundle of `artifact` for its target to `out` (a .tar.gz); returns `out`.
    `target_name`, if given, must be the artifact's target; `build_root` holds the runtime's
    CMake build tree per target (default: build/ of the source checkout)."""
    artifact, out = Path(artifact), Path(out)
    manifest_path = artifact / "manifest.json"
    if not manifest_path.is_file():
        raise BundleError(f"{artifact} is not an EdgeMoE artifact (no manifest.json): compile it with edgemoe-compile")
    manifest = json.loads(manifest_path.read_text())
    if target_name is not None and target_name != manifest["target"]:
        raise BundleError(f"{artifact} was compiled for {manifest['target']!r}, not {target_name!r}: compile it for "
                          f"{target_name} (edgemoe-compile --target {target_name}) or package it for its own target")
    target = load_target(manifest["target"]).with_android_api(android_api)
    if not out.name.endswith(".tar.gz"):
        raise BundleError(f"{out}: a bundle is a .tar.gz; name it e.g. {out.name}.tar.gz")
    name = out.name[: -len(".tar.gz")]
    build_dir = Path(build_root or REPO_ROOT / "build") / f"bundle-{target.name}"
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}.", dir=out.parent) as tmp:
        top = Path(tmp) / name
        build_runtime_for(target, build_dir, top)
        log(f"built the runtime for {target.name} ({' '.join(toolchain.cmake_cross_args(target))})")
        shutil.copytree(artifact, top / "model")
        run = top / "run.sh"
        run.write_text(RUN_SCRIPT.format(shell=SHELLS[target.os]))
        run.chmod(0o755)
        files = {str(p.relative_to(top)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                 for p in sorted(top.rglob("*")) if p.is_file()}
        (top / "bundle.json").write_text(json.dumps({
            "format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, "target": target.name,
            "android_api": target.android_api if target.os == "android" else None,
            "compile_id": manifest["compile_id"], "cmake": toolchain.cmake_cross_args(target), "files": files},
            indent=2) + "\n")
        partial = Path(tmp) / "bundle.tar.gz"
        with tarfile.open(partial, "w:gz") as tar:
            tar.add(top, arcname=name)
        os.replace(partial, out)
    log(f"bundle for {target.name} written to {out} ({out.stat().st_size / 2**20:.1f} MiB)")
    return out
