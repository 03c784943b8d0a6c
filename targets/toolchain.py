"""The programs a target needs on this machine: its C compiler (to link kernels.so and to build
the runtime), and, to run its binaries here, an emulator. Each is resolved before any work starts,
and a missing one is named with what provides it: a Debian package, or the Android NDK's variable.

Android: NDK compilers carry the API level in their name (`aarch64-linux-android28-clang`) and
live in `$ANDROID_NDK_HOME/toolchains/llvm/prebuilt/<host>/bin`; a target's `cc` names them with
`{api}` standing for its `android_api`.
"""
from __future__ import annotations

import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path

# Debian/Ubuntu packages providing each program a target names (scripts/setup-dev.sh installs them).
DEBIAN_PACKAGES = {
    "cc": "build-essential",
    "gcc": "build-essential",
    "c++": "build-essential",
    "aarch64-linux-gnu-gcc": "gcc-aarch64-linux-gnu",
    "aarch64-linux-gnu-g++": "g++-aarch64-linux-gnu",
    "qemu-aarch64": "qemu-user",
    "cmake": "cmake",
}
# Where qemu-user finds the target's dynamic loader and libc (libc6-dev-arm64-cross, libstdc++6-arm64-cross).
QEMU_SYSROOTS = {"aarch64": "/usr/aarch64-linux-gnu"}
NDK_VARIABLE = "ANDROID_NDK_HOME"


class ToolchainError(RuntimeError):
    pass


def arch_of(target) -> str:
    return target.resolved_tvm_target()["mtriple"].split("-")[0]


def is_native(target) -> bool:
    return arch_of(target) == platform.machine()


def ndk_root() -> Path:
    root = os.environ.get(NDK_VARIABLE)
    if not root:
        raise ToolchainError(f"the Android target needs the NDK: set {NDK_VARIABLE} to its directory "
                             "(r23 or later; developer.android.com/ndk/downloads)")
    return Path(root)


def ndk_host_tag() -> str:
    """The NDK's prebuilt folder for this machine (NDKs ship x86_64 host tools, also for Apple silicon)."""
    return f"{'darwin' if platform.system() == 'Darwin' else 'linux'}-x86_64"


def ndk_compiler_name(target) -> str:
    if not target.android_api:
        raise ToolchainError(f"target {target.name!r} names an NDK compiler but no Android API level "
                             "(android_api in its description, or --android-api)")
    return target.cc.format(api=target.android_api)


def ndk_bin() -> Path:
    return ndk_root() / "toolchains" / "llvm" / "prebuilt" / ndk_host_tag() / "bin"


def compiler(target) -> str:
    """The absolute path of `target`'s C compiler; ToolchainError naming what provides it if absent."""
    if target.os == "android":
        path = ndk_bin() / ndk_compiler_name(target)
        if not os.access(path, os.X_OK):
            raise ToolchainError(f"{path} not found: {NDK_VARIABLE}={ndk_root()} is not an NDK with "
                                 f"{path.name} (API level {target.android_api}); point {NDK_VARIABLE} at NDK "
                                 "r23 or later")
        return str(path)
    return require_program(target.cc, f"the C compiler of target {target.name!r}")


def require_program(name: str, role: str) -> str:
    found = shutil.which(name)
    if found is None:
        package = DEBIAN_PACKAGES.get(name)
        fix = f"apt-get install {package}" if package else "install it and put it on PATH"
        raise ToolchainError(f"{role}, {name}, not found on PATH: {fix} (scripts/setup-dev.sh installs what the "
                             "tests need)")
    return found


@dataclass(frozen=True)
class Emulator:
    """How to run the target's Linux binaries on this machine: a command prefix (empty when native)."""

    prefix: tuple[str, ...]

    def command(self, *args) -> list[str]:
        return [*self.prefix, *map(str, args)]


def emulator(target) -> Emulator:
    """Runs `target`'s binaries here: directly when it is this machine's architecture, else under
    qemu-user with the cross sysroot; ToolchainError naming the package otherwise."""
    arch = arch_of(target)
    if is_native(target):
        return Emulator(())
    if target.os != "linux" or arch not in QEMU_SYSROOTS:
        raise ToolchainError(f"target {target.name!r} ({target.os}, {arch}) cannot be run on this "
                             f"{platform.machine()} machine: run it on the device")
    qemu = require_program(f"qemu-{arch}", f"the emulator for {arch} binaries")
    sysroot = QEMU_SYSROOTS[arch]
    if not Path(sysroot, "lib").is_dir():
        raise ToolchainError(f"{sysroot} (the {arch} C library qemu runs binaries against) is missing: "
                             f"apt-get install libc6-dev-arm64-cross")
    return Emulator((qemu, "-L", sysroot))


ANDROID_ABIS = {"aarch64": "arm64-v8a"}


def ndk_cmake_toolchain() -> Path:
    return ndk_root() / "build" / "cmake" / "android.toolchain.cmake"


def cmake_cross_args(target) -> list[str]:
    """CMake configure arguments that build the C runtime for `target` with its toolchain: the
    target's compiler for Linux (a cross compiler when the architecture differs), the NDK's
    android.toolchain.cmake for Android (ABI and API level from the target)."""
    arch = arch_of(target)
    if target.os == "android":
        if arch not in ANDROID_ABIS:
            raise ToolchainError(f"no Android ABI for {arch} (known: {', '.join(ANDROID_ABIS)})")
        compiler(target)  # the NDK is there and has this API level's compiler
        return [f"-DCMAKE_TOOLCHAIN_FILE={ndk_cmake_toolchain()}", f"-DANDROID_ABI={ANDROID_ABIS[arch]}",
                f"-DANDROID_PLATFORM=android-{target.android_api}"]
    args = [f"-DCMAKE_C_COMPILER={compiler(target)}"]
    if not is_native(target):
        args += ["-DCMAKE_SYSTEM_NAME=Linux", f"-DCMAKE_SYSTEM_PROCESSOR={arch}"]
    return args
