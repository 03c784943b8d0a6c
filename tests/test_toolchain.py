"""A target's toolchain is found before a compile imports, quantizes or writes anything, and a
missing one is named with what provides it (a Debian package, the NDK's variable); the Android
target names the NDK's compiler with its API level."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from edgemoe.cli import compile_cmd
from edgemoe.targets import load_target, toolchain

from conftest import fake_ndk


def _without(monkeypatch, *programs):
    real = toolchain.shutil.which
    monkeypatch.setattr(toolchain.shutil, "which", lambda name: None if name in programs else real(name))


def _fail_on_import(monkeypatch):
    from edgemoe.compiler import driver

    def refuse(*a, **k):
        raise AssertionError("the model was imported before the toolchain was checked")
    monkeypatch.setattr(driver, "load_model", refuse)


@pytest.mark.parametrize("target,program,package", [("rpi5", "aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu"),
                                                    ("host", "cc", "build-essential")])
def test_missing_compiler_is_named_with_its_package_before_anything_is_written(
        tiny_mixtral_dir, tmp_path, monkeypatch, target, program, package):
    _without(monkeypatch, program)
    _fail_on_import(monkeypatch)
    out = tmp_path / "out"
    r = CliRunner().invoke(compile_cmd, [str(tiny_mixtral_dir), "-o", str(out), "--target", target])
    assert r.exit_code == 1, r.output
    assert program in r.output and f"apt-get install {package}" in r.output, r.output
    assert list(tmp_path.iterdir()) == []  # no output, no working directory


def test_missing_emulator_is_named_with_its_package(monkeypatch):
    _without(monkeypatch, "qemu-aarch64")
    with pytest.raises(toolchain.ToolchainError, match="apt-get install qemu-user"):
        toolchain.emulator(load_target("rpi5"))
    assert toolchain.emulator(load_target("host")).command("x") == ["x"]


def test_android_without_ndk_names_the_variable(tiny_mixtral_dir, tmp_path, monkeypatch):
    monkeypatch.delenv(toolchain.NDK_VARIABLE, raising=False)
    _fail_on_import(monkeypatch)
    out = tmp_path / "out"
    r = CliRunner().invoke(compile_cmd, [str(tiny_mixtral_dir), "-o", str(out), "--target", "phone-ufs31"])
    assert r.exit_code == 1 and "ANDROID_NDK_HOME" in r.output, r.output
    assert list(tmp_path.iterdir()) == []


def test_android_compiler_carries_the_api_level(tmp_path, monkeypatch):
    ndk = tmp_path / "ndk"
    bin_dir = fake_ndk(ndk, "aarch64-linux-android28-clang")
    monkeypatch.setenv(toolchain.NDK_VARIABLE, str(ndk))
    phone = load_target("phone-ufs31")
    assert phone.android_api == 28
    assert toolchain.compiler(phone) == str(bin_dir / "aarch64-linux-android28-clang")
    args = toolchain.cmake_cross_args(phone)
    assert args == [f"-DCMAKE_TOOLCHAIN_FILE={ndk}/build/cmake/android.toolchain.cmake", "-DANDROID_ABI=arm64-v8a",
                    "-DANDROID_PLATFORM=android-28"]
    newer = phone.with_android_api(33)  # --android-api 33: this NDK has no API 33 compiler
    with pytest.raises(toolchain.ToolchainError, match="aarch64-linux-android33-clang"):
        toolchain.compiler(newer)
    with pytest.raises(ValueError, match="Android targets"):
        load_target("rpi5").with_android_api(30)
