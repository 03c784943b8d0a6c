"""Board descriptions: the TVM target, toolchain, RAM and storage of each device EdgeMoE compiles for."""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

import tvm


class UnknownTargetError(ValueError):
    pass


@dataclass(frozen=True)
class TargetDesc:
    name: str
    description: str
    tvm_target: dict
    os: str
    cc: str
    kernel_library: str
    ram_bytes: int | None
    storage: dict
    android_api: int | None = None  # Android targets: the API level the NDK compiler is named for (toolchain.py)
    # microcontrollers (os "none"): memory map, flash, CPU flags, int8 dot instructions, sources
    board: dict | None = None
    # boards whose compute benchmarks emulate: memory bandwidth (bytes/s), int8 and fp32 throughput
    # (operations/s, a multiply-accumulate counting two), with the published figures they come from
    compute: dict | None = None

    def compute_emulation(self) -> tuple[float, float, float] | None:
        """(memory bandwidth, int8 ops/s, fp32 FLOP/s) for the runtime's compute emulation, or None."""
        if not self.compute:
            return None
        c = self.compute
        return float(c["memory_bandwidth_bytes_per_s"]), float(c["int8_ops_per_s"]), float(c["fp32_flops_per_s"])

    def resolved_tvm_target(self) -> dict:
        """The TVM target dict with 'native' triple/cpu replaced by what LLVM detects on this machine."""
        from tvm.target import codegen

        t = dict(self.tvm_target)
        if t.get("mtriple") == "native":
            # LLVM reports a vendor-specific triple (x86_64-conda-linux-gnu) that drops -mcpu; use the plain one.
            arch = codegen.llvm_get_system_triple().split("-")[0]
            t["mtriple"] = f"{arch}-linux-gnu"
        if t.get("mcpu") == "native":
            t["mcpu"] = codegen.llvm_get_system_cpu()
        return t

    def tvm(self) -> tvm.target.Target:
        return tvm.target.Target(self.resolved_tvm_target())

    def with_android_api(self, api: int | None) -> "TargetDesc":
        """This target for another Android API level (None: as described)."""
        from dataclasses import replace

        if api is None:
            return self
        if self.os != "android":
            raise ValueError(f"--android-api applies to Android targets; {self.name!r} runs {self.os}")
        return replace(self, android_api=api)


def available() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(__name__).iterdir() if p.name.endswith(".json"))


def load_target(name: str) -> TargetDesc:
    path = resources.files(__name__) / f"{name}.json"
    if not path.is_file():
        raise UnknownTargetError(f"unknown target {name!r}; available targets: {', '.join(available())}")
    d = json.loads(path.read_text())
    return TargetDesc(**d)
