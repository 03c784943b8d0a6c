"""Microcontroller artifacts on this machine: build an artifact's firmware with CMake and
arm-none-eabi-gcc, and run it under qemu-system-arm with its flash image at the board's flash
address (runtime_c/firmware/firmware_main.c prints what it measured, one "key value" a line)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from .runtime import REPO_ROOT

TOOLCHAIN_FILE = REPO_ROOT / "runtime_c" / "firmware" / "arm-none-eabi.cmake"
QEMU = "qemu-system-arm"


def _board(artifact_dir: Path) -> tuple[str, dict]:
    from .targets import load_target

    manifest = json.loads((Path(artifact_dir) / "manifest.json").read_text())
    target = load_target(manifest["target"])
    if target.board is None:
        raise ValueError(f"{artifact_dir} was compiled for {target.name}, not a microcontroller: compile it with "
                         "--target mps3-an547 (or another board in targets/)")
    return target.name, target.board


def build_firmware(artifact_dir: str | Path, build_dir: str | Path) -> Path:
    """Configure and build the firmware of a microcontroller artifact; returns the ELF."""
    artifact_dir, build_dir = Path(artifact_dir).resolve(), Path(build_dir)
    _board(artifact_dir)
    missing = [t for t in ("cmake", "arm-none-eabi-gcc") if shutil.which(t) is None]
    if missing:
        raise RuntimeError(f"{', '.join(missing)} not found: apt-get install cmake gcc-arm-none-eabi "
                           "libnewlib-arm-none-eabi (scripts/setup-dev.sh does)")
    configure = ["cmake", "-S", str(REPO_ROOT), "-B", str(build_dir), f"-DCMAKE_TOOLCHAIN_FILE={TOOLCHAIN_FILE}",
                 "-DCMAKE_BUILD_TYPE=Release", "-DEM_BAREMETAL=ON", f"-DEM_FIRMWARE_ARTIFACT={artifact_dir}"]
    for cmd in (configure, ["cmake", "--build", str(build_dir), "-j", str(os.cpu_count() or 1)]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"building the firmware failed: {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    return build_dir / "edgemoe_firmware.elf"


def qemu_command(elf: str | Path, artifact_dir: str | Path, args: list[str]) -> list[str]:
    """qemu-system-arm running the firmware with the artifact's flash.bin written at the board's flash
    address, one instruction per virtual nanosecond (-icount shift=0), output over semihosting."""
    _, board = _board(Path(artifact_dir))
    if board.get("qemu_machine") is None:
        raise ValueError("this board has no qemu machine: flash it (README, 'microcontroller')")
    return [QEMU, "-M", board["qemu_machine"], "-nographic", "-icount", "shift=0",
            "-semihosting-config", "enable=on,target=native", "-kernel", str(elf), "-append", " ".join(args),
            "-device", f"loader,file={Path(artifact_dir) / 'flash.bin'},addr=0x{board['flash']['address']:08x}"]


def run_firmware(elf: str | Path, artifact_dir: str | Path, args: list[str], timeout: float = 600) -> dict:
    """Runs the firmware under qemu; returns its report: "tokens" as a list of ids, numbers as numbers."""
    if shutil.which(QEMU) is None:
        raise RuntimeError(f"{QEMU} not found: apt-get install qemu-system-arm (scripts/setup-dev.sh does)")
    proc = subprocess.run(qemu_command(elf, artifact_dir, args), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"the firmware failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    report: dict = {}
    for line in proc.stdout.splitlines()[1:]:
        key, _, value = line.partition(" ")
        if key == "tokens":
            report[key] = [int(t) for t in value.split(",")]
        else:
            try:
                report[key] = float(value) if "." in value else int(value)
            except ValueError:
                report[key] = value
    return report
