"""Deploy bundles (edgemoe-package): a Raspberry Pi 5 bundle, unpacked alone in an empty directory,
runs under qemu-aarch64 and generates the host runtime's tokens for the same model; the Android
bundle's runtime build goes through the NDK's CMake toolchain file."""
from __future__ import annotations

import json
import os
import subprocess
import tarfile

import pytest
from click.testing import CliRunner

from edgemoe.bundle import RUN_SCRIPT, runtime_commands
from edgemoe.cli import package_cmd
from edgemoe.compiler.driver import CompileOptions, compile_model
from edgemoe.runtime import REPO_ROOT, Session
from edgemoe.targets import load_target, toolchain

from conftest import PROMPTS, TRAINED_MODEL, fake_ndk

N_NEW = 24
EM_AARCH64 = 183  # ELF e_machine


def test_rpi5_bundle_unpacked_alone_runs_under_qemu_with_the_hosts_tokens(runtime_lib, tokenizer, tmp_path):
    try:
        qemu = toolchain.emulator(load_target("rpi5"))
    except toolchain.ToolchainError as e:
        pytest.fail(str(e))
    opts = dict(expert_bits=4, max_seq=128)
    compile_model(TRAINED_MODEL, tmp_path / "rpi5", CompileOptions(target="rpi5", **opts), log=lambda m: None)
    compile_model(TRAINED_MODEL, tmp_path / "host", CompileOptions(target="host", **opts), log=lambda m: None)
    ids = tokenizer.encode(PROMPTS[0]).ids
    with Session(tmp_path / "host") as s:
        want = s.generate(ids, N_NEW)

    bundle = tmp_path / "dist" / "mini-rpi5.tar.gz"
    r = CliRunner().invoke(package_cmd, [str(tmp_path / "rpi5"), "-o", str(bundle), "--target", "rpi5"])
    assert r.exit_code == 0, r.output
    (tmp_path / "rpi5" / "kernels.so").unlink()  # nothing outside the bundle can be used

    alone = tmp_path / "board"
    alone.mkdir()
    with tarfile.open(bundle) as tar:
        tar.extractall(alone, filter="tar")
    assert [p.name for p in alone.iterdir()] == ["mini-rpi5"]
    top = alone / "mini-rpi5"
    info = json.loads((top / "bundle.json").read_text())
    assert info["target"] == "rpi5"
    for rel in ("bin/edgemoe_run", "lib/libedgemoe.so", "include/edgemoe.h", "run.sh", "model/kernels.so",
                "model/experts.bin", "model/trunk.bin"):
        assert rel in info["files"] and (top / rel).is_file(), rel
    for rel in ("bin/edgemoe_run", "lib/libedgemoe.so"):
        header = (top / rel).read_bytes()[:20]
        assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == EM_AARCH64, rel

    env = dict(os.environ, EDGEMOE_EMULATOR=" ".join(qemu.prefix))
    proc = subprocess.run(["sh", "./mini-rpi5/run.sh", "--tokens", ",".join(map(str, ids)), "-n", str(N_NEW)],
                          cwd=alone, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert [int(t) for t in proc.stdout.splitlines()[0].split(",")] == want


def test_android_runtime_is_built_with_the_ndk_toolchain_file(tmp_path, monkeypatch):
    """The NDK cannot be installed here: the commands the packager would run are checked, over an
    NDK's directory layout."""
    phone = load_target("phone-ufs31").with_android_api(30)
    monkeypatch.delenv(toolchain.NDK_VARIABLE, raising=False)
    art = tmp_path / "art"
    art.mkdir()
    (art / "manifest.json").write_text(json.dumps({"target": "phone-ufs31", "compile_id": "00" * 16}))
    r = CliRunner().invoke(package_cmd, [str(art), "-o", str(tmp_path / "dist" / "phone.tar.gz")])
    assert r.exit_code == 1 and "ANDROID_NDK_HOME" in r.output, r.output
    assert not (tmp_path / "dist").exists() or not any((tmp_path / "dist").iterdir())

    ndk = tmp_path / "ndk"
    fake_ndk(ndk, "aarch64-linux-android30-clang")
    monkeypatch.setenv(toolchain.NDK_VARIABLE, str(ndk))
    configure, build, install = runtime_commands(phone, tmp_path / "b", tmp_path / "p")
    assert configure[:5] == ["cmake", "-S", str(REPO_ROOT), "-B", str(tmp_path / "b")]
    assert f"-DCMAKE_TOOLCHAIN_FILE={ndk}/build/cmake/android.toolchain.cmake" in configure
    assert "-DANDROID_ABI=arm64-v8a" in configure and "-DANDROID_PLATFORM=android-30" in configure
    assert not any(a.startswith("-DCMAKE_C_COMPILER") for a in configure)  # the toolchain file picks clang
    assert build[:3] == ["cmake", "--build", str(tmp_path / "b")] and "edgemoe_run" in build
    assert install == ["cmake", "--install", str(tmp_path / "b"), "--prefix", str(tmp_path / "p")]
    assert RUN_SCRIPT.format(shell="/system/bin/sh").startswith("#!/system/bin/sh\n")


def test_a_bundle_for_another_target_than_the_artifacts_is_refused(tmp_path):
    art = tmp_path / "art"
    art.mkdir()
    (art / "manifest.json").write_text(json.dumps({"target": "rpi5", "compile_id": "00" * 16}))
    r = CliRunner().invoke(package_cmd, [str(art), "-o", str(tmp_path / "x.tar.gz"), "--target", "rpi4"])
    assert r.exit_code == 1 and "compiled for 'rpi5', not 'rpi4'" in r.output, r.output
    assert not (tmp_path / "x.tar.gz").exists()
