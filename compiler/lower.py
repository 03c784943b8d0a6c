"""Lower the decode kernels through TVM and produce the library the C runtime loads."""
from __future__ import annotations

import subprocess
from pathlib import Path

import tvm

from ..models import MoEConfig
from ..targets import TargetDesc
from ..targets.toolchain import ToolchainError, compiler
from .kernels import batched_kernels, decode_kernels
from .progress import stage, tuning_jobs
from .int_dot import Knobs
from .schedules import schedule
from .measure import local_measurer
from .tuning import TuningStore, kernel_key, runs_here, schedules_for, spaces, tune


def build_kernels(cfg: MoEConfig, expert_bits: list[int], trunk_bits: int, layout: str, group: int, target: TargetDesc,
                  out_dir: Path, store: TuningStore | None = None, tune_missing: bool = False, progress=None,
                  cc: str | None = None, weight_bytes: int = 0, int4_grid: str = "half", kv_cache: str = "float32") -> dict:
    """Compile every kernel for `target` into out_dir/kernels.o and, for the host, link kernels.so.
    Schedules (float kernels' lanes, integer-dot kernels' knobs) come from the tuning store where it
    has a record; with `tune_missing`, kernels without one are tuned first (and recorded, so the
    next compile does not tune again). `progress`: a progress factory (compiler/progress.py) for the tuning runs and the TVM compile and link. `cc`:
    the target's C compiler, resolved (targets/toolchain.py; default: resolved here). `weight_bytes`: the
    artifact's resident weights, which decide whether tuning times kernels with cold caches
    (measure.local_measurer). `int4_grid`: the levels of INT4 matrices (the artifact's: its experts' and trunk's).
    `kv_cache`: the KV cache's element type, which attention reads."""
    variants: dict = {}
    funcs = decode_kernels(cfg, expert_bits, group, trunk_bits, layout, target.tvm(), variants=variants,
                           int4_grid=int4_grid, kv_cache=kv_cache)
    tuned_now = {}
    if store is not None and tune_missing:
        measurer = local_measurer(weight_bytes) if runs_here(target) else None  # else tune() names the way
        tuned_now = tune(funcs, target, store, progress=tuning_jobs(progress), variants=variants, measurer=measurer)
    chosen = schedules_for(funcs, store) if store is not None else {}
    funcs = {**funcs, **{n: variants[n](Knobs(**s)) for n, s in chosen.items() if n in variants}}
    if layout == "tiles" and target.kernel_library == "shared":  # a hosted runtime's prompts go in batches
        funcs.update(batched_kernels(cfg, expert_bits, group, target.tvm(), trunk_bits, int4_grid))
    lanes = {n: s["lanes"] for n, s in chosen.items() if n not in variants}
    with stage(progress, f"lowering {len(funcs)} kernels (tvm.compile)"):
        exe = tvm.compile(schedule(tvm.IRModule(funcs), lanes), target=target.tvm())
        obj = out_dir / "kernels.o"
        exe.mod.write_to_file(str(obj))
    info = {"object": obj.name, "symbols": sorted(funcs), "tvm_target": target.resolved_tvm_target(),
            "schedules": {n: {"schedule": chosen.get(n, space.default),
                              "from": "tuned now" if n in tuned_now else "tuning record" if n in chosen else "default",
                              "measured_on": store.measured_on(kernel_key(n, funcs[n])) if n in chosen else None}
                          for n, space in sorted(spaces(funcs, variants).items())},
            "tuning_store": str(store.path) if store is not None else None}
    if target.kernel_library == "shared":
        cc = cc or compiler(target)
        lib = out_dir / "kernels.so"
        # TVMFFIErrorSetRaisedFromCStrParts stays undefined: the EdgeMoE runtime provides it.
        with stage(progress, f"linking {lib.name}"):
            proc = subprocess.run([cc, "-shared", "-o", str(lib), str(obj)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise ToolchainError(f"linking {lib} failed:\n{proc.stderr}")
        info["library"] = lib.name
    return info
