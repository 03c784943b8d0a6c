"""Kernel tuning: search each matrix-vector kernel's schedule on the machine that will run it and
keep the best in a record store on disk, keyed by target and kernel shape.

The search space is the default schedule's one knob that matters on CPUs (schedules.py): how many
reduction lanes each row's dot product is split into, which sets the vector width and how many
packed codes are decoded side by side. Candidates are built here and timed where a measurer says
(measure.py: this machine, boards behind TVM RPC, a minimal RPC server); the store keeps one file
per target and CPU, one record per kernel shape and bitwidth, with where it was measured.
`edgemoe-compile` looks records up; a kernel without one gets the hand default.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from pathlib import Path

import tvm

from ..targets import TargetDesc
from .cache import cache_dir
from .measure import Candidate, Local
from .schedules import DEFAULT_LANES, has_gemv_blocks

CANDIDATE_LANES = (4, 8, 16, 32, 64)


class TuningError(RuntimeError):
    pass


def kernel_key(name: str, func: tvm.tirx.PrimFunc) -> str:
    """The kernel's symbol and its parameter shapes and types: a record applies to exactly that."""
    params = []
    for p in func.params:  # TVM 0.27: a PrimFunc's params are buffer-like vars with shape and dtype
        params.append(f"{p.dtype}[{'x'.join(str(d) for d in p.shape)}]")
    return f"{name}({','.join(params)})"


class TuningStore:
    """One JSON file per target (its name and resolved TVM target): {kernel_key: record}."""

    def __init__(self, target: TargetDesc, root: Path | None = None):
        resolved = json.dumps(target.resolved_tvm_target(), sort_keys=True)
        digest = hashlib.sha256(resolved.encode()).hexdigest()[:12]
        self.path = Path(root or cache_dir() / "tuning") / f"{target.name}-{digest}.json"
        self.target = target
        self.records: dict[str, dict] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def lanes(self, key: str) -> int | None:
        rec = self.records.get(key)
        return int(rec["lanes"]) if rec else None

    def measured_on(self, key: str) -> str | None:
        rec = self.records.get(key)
        return rec.get("measured_on", "this machine") if rec else None

    def put(self, key: str, record: dict) -> None:
        self.records[key] = record
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # write-then-rename: a tuning run cut off midway never leaves a half-written store
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(self.records, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)


def runs_here(target: TargetDesc) -> bool:
    """Whether kernels built for `target` can be timed on this machine."""
    triple = target.resolved_tvm_target().get("mtriple", "")
    return target.kernel_library == "shared" and triple.split("-")[0] == platform.machine()


def tunable(funcs: dict[str, tvm.tirx.PrimFunc]) -> dict[str, tvm.tirx.PrimFunc]:
    """The kernels the search applies to: matrix-vector blocks over static shapes."""
    return {n: f for n, f in funcs.items() if has_gemv_blocks(f) and
            all(isinstance(d, tvm.tirx.IntImm) for p in f.params for d in p.shape)}


def tune(funcs: dict[str, tvm.tirx.PrimFunc], target: TargetDesc, store: TuningStore,
         candidates=CANDIDATE_LANES, number: int = 50, retune: bool = False, progress=None,
         measurer=None) -> dict[str, int]:
    """Time every candidate for each tunable kernel without a record (all of them with `retune`)
    with `measurer` (default: this machine, `number` calls per run); store the fastest. `progress`:
    a one-argument progress wrapper over the kernels. Returns {kernel: lanes} for the kernels tuned
    in this call."""
    if measurer is None:
        if not runs_here(target):
            raise TuningError(f"target {target.name!r} does not run on this machine ({platform.machine()}): time it "
                              f"on the device through TVM RPC (edgemoe-tune --rpc HOST:PORT, or --rpc-tracker "
                              f"HOST:PORT --rpc-key KEY; --minrpc for a board without Python), or tune on the device "
                              f"itself and copy its record store ({store.path.name}) into {store.path.parent}")
        measurer = Local(number)
    todo = [(n, f) for n, f in tunable(funcs).items() if retune or store.lanes(kernel_key(n, f)) is None]
    groups = [[Candidate(n, f, lanes) for lanes in candidates] for n, f in todo]
    seconds = measurer.measure(groups, target, progress) if groups else {}
    tuned = {}
    for (n, f), group in zip(todo, groups):
        timings = {c.lanes: seconds[c.symbol] for c in group}
        best = min(timings, key=timings.get)
        store.put(kernel_key(n, f), {"lanes": best, "us": round(timings[best] * 1e6, 3),
                                     "default_us": round(timings.get(DEFAULT_LANES, float("nan")) * 1e6, 3),
                                     "candidates_us": {str(k): round(v * 1e6, 3) for k, v in timings.items()},
                                     "cpu": target.resolved_tvm_target().get("mcpu", ""),
                                     "measured_on": measurer.where})
        tuned[n] = best
    return tuned


def lanes_for(funcs: dict[str, tvm.tirx.PrimFunc], store: TuningStore) -> dict[str, int]:
    """{kernel: lanes} from the store; kernels without a record are left out (hand default)."""
    out = {}
    for n, f in funcs.items():
        lanes = store.lanes(kernel_key(n, f))
        if lanes is not None:
            out[n] = lanes
    return out
