"""Kernel tuning: search each matrix-vector kernel's schedule on the machine that will run it and
keep the best in a record store on disk, keyed by target and kernel shape.

Each kernel has a search space (`spaces`): knobs and the values to try, and its hand schedule. A
float-dequantizing kernel's one knob that matters on CPUs (schedules.py) is how many reduction
lanes each row's dot product is split into, which sets the vector width and how many packed codes
are decoded side by side. An integer-dot kernel's are int_dot.Knobs: accumulation chains, tiles
per step of the row loop, vectors per group step, group-loop unrolling, the gate and up matrices in
one loop, software prefetch distance, and whether the rows are split over threads. The search
starts from the hand schedule and moves one knob at a time: each round times every schedule one
knob away from the best so far, until a round finds nothing faster or `rounds` are done (with one
knob, as the float kernels have, that is every candidate, timed side by side with the hand
schedule). With several knobs the winner is timed once more beside the hand schedule and kept only
if it wins again, so a record is never slower than the hand schedule as measured. Candidates are
built here and timed where a measurer says (measure.py: this machine, boards behind TVM RPC, a
minimal RPC server); the store keeps one file per target and CPU, one record per kernel shape and
bitwidth, with where it was measured. `edgemoe-compile` looks records up; a kernel without one gets
the hand schedule.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import tvm

from ..targets import TargetDesc
from .cache import cache_dir
from .int_dot import Knobs, knobs_of
from .measure import Candidate, Local
from .schedules import DEFAULT_LANES, has_gemv_blocks

CANDIDATE_LANES = (4, 8, 16, 32, 64)
# the values each integer-dot knob may take (those that do not fit a kernel are left out of its space)
INT_DOT_SPACE = {"chains": (1, 2, 4), "tiles": (1, 2, 4, 8), "vectors": (1, 2, 4), "unroll": (1, 2),
                 "fuse": (False, True), "prefetch": (0, 8, 32), "parallel": (False, True)}
ROUNDS = 3


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
        for rec in self.records.values():  # a store written before the integer-dot knobs: a float kernel's lanes
            rec.setdefault("schedule", {"lanes": rec.get("lanes")})

    def schedule(self, key: str) -> dict | None:
        rec = self.records.get(key)
        return dict(rec["schedule"]) if rec else None

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


@dataclass(frozen=True)
class Space:
    """A kernel's schedule search space: knob → values to try, the hand schedule, and the kernel to
    schedule for a choice of knobs (an integer-dot kernel is rebuilt; a float one is scheduled)."""

    knobs: dict
    default: dict
    build: Callable[[dict], tvm.tirx.PrimFunc]


def label(schedule: dict, base: dict | None = None) -> str:
    """A schedule as the records' and the tables' text: knob=value, comma-separated, knobs in
    alphabetical order (as the store writes them); with `base`, only the knobs that differ from it."""
    return ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in sorted(schedule.items())
                    if base is None or base.get(k) != v)


def spaces(funcs: dict[str, tvm.tirx.PrimFunc], variants: dict[str, Callable] | None = None,
           lanes=CANDIDATE_LANES, int_dot_space: dict | None = None) -> dict[str, Space]:
    """The search space of each kernel the search applies to: matrix-vector blocks over static
    shapes (float kernels: `lanes`), and the integer-dot kernels whose builders `variants` has
    (kernels.decode_kernels fills it; their knobs' values: `int_dot_space`, default INT_DOT_SPACE)."""
    out = {}
    for n, f in funcs.items():
        knobs = knobs_of(f)
        if knobs is not None:
            if variants is not None and n in variants:
                build = variants[n]
                out[n] = Space(int_dot_space or INT_DOT_SPACE, asdict(knobs), lambda s, b=build: b(Knobs(**s)))
        elif has_gemv_blocks(f) and all(isinstance(d, tvm.tirx.IntImm) for p in f.params for d in p.shape):
            out[n] = Space({"lanes": tuple(lanes)}, {"lanes": DEFAULT_LANES}, lambda s, f=f: f)
    return out


def tunable(funcs: dict[str, tvm.tirx.PrimFunc], variants: dict[str, Callable] | None = None) -> list[str]:
    """The kernels the search applies to (those `spaces` gives a space)."""
    return list(spaces(funcs, variants))


def _neighbours(space: Space, best: dict) -> list[dict]:
    """Every schedule one knob away from `best`."""
    return [{**best, knob: v} for knob, values in space.knobs.items() for v in values if v != best[knob]]


def tune(funcs: dict[str, tvm.tirx.PrimFunc], target: TargetDesc, store: TuningStore,
         candidates=CANDIDATE_LANES, number: int = 50, retune: bool = False, progress=None,
         measurer=None, variants: dict[str, Callable] | None = None, int_dot_space: dict | None = None,
         rounds: int = ROUNDS) -> dict[str, dict]:
    """Search the schedule of every tunable kernel without a record (all of them with `retune`),
    timing with `measurer` (default: this machine, `number` calls per run), and store the fastest:
    its schedule, its time and the hand schedule's (from the same round, or from the second timing
    side by side, see below) and every candidate's time in the search.
    `candidates`: the float kernels' lane counts; `variants`, `int_dot_space`: as `spaces`;
    `progress`: a one-argument progress wrapper over each round's kernels. Returns {kernel:
    schedule} for the kernels tuned in this call."""
    if measurer is None:
        if not runs_here(target):
            raise TuningError(f"target {target.name!r} does not run on this machine ({platform.machine()}): time it "
                              f"on the device through TVM RPC (edgemoe-tune --rpc HOST:PORT, or --rpc-tracker "
                              f"HOST:PORT --rpc-key KEY; --minrpc for a board without Python), or tune on the device "
                              f"itself and copy its record store ({store.path.name}) into {store.path.parent}")
        measurer = Local(number)
    todo = {n: sp for n, sp in spaces(funcs, variants, candidates, int_dot_space).items()
            if retune or store.schedule(kernel_key(n, funcs[n])) is None}
    timed: dict[str, dict[str, tuple[dict, float]]] = {n: {} for n in todo}  # kernel → label → (schedule, s)
    pending = {n: [sp.default, *_neighbours(sp, sp.default)] for n, sp in todo.items()}
    for _ in range(rounds):
        groups = []
        for n, scheds in pending.items():
            group = []
            for sched in scheds:
                if label(sched) in timed[n]:
                    continue
                try:
                    func = todo[n].build(sched)
                except ValueError:  # knobs that do not fit this kernel's shape
                    continue
                group.append(Candidate(n, func, sched))
            if group:
                groups.append(group)
        if not groups:
            break
        seconds = measurer.measure(groups, target, progress)
        for group in groups:
            for c in group:
                timed[c.kernel][label(c.schedule)] = (c.schedule, seconds[c.symbol])
        pending = {}
        for group in groups:
            n = group[0].kernel
            best = min(timed[n].values(), key=lambda st: st[1])[0]
            if any(c.schedule == best for c in group):  # a new best (or the hand one): search around it
                pending[n] = _neighbours(todo[n], best)
    best = {n: min(results.values(), key=lambda st: st[1]) for n, results in timed.items()}
    hand = {n: timed[n][label(todo[n].default)][1] for n in timed}
    # A winner of a search over several knobs (found in a later round than the hand schedule's
    # timing, or by a lucky measurement among many) is timed again beside the hand schedule, and
    # kept only if it wins again.
    again = [[Candidate(n, todo[n].build(sched), sched) for sched in (todo[n].default, best[n][0])]
             for n in timed if len(todo[n].knobs) > 1 and best[n][0] != todo[n].default]
    if again:
        seconds = measurer.measure(again, target, progress)
        for default, winner in again:
            n = default.kernel
            hand[n] = seconds[default.symbol]
            best[n] = (winner.schedule, seconds[winner.symbol]) if seconds[winner.symbol] < hand[n] else \
                (default.schedule, hand[n])
    tuned = {}
    for n, results in timed.items():
        store.put(kernel_key(n, funcs[n]), {"schedule": best[n][0], "us": round(best[n][1] * 1e6, 3),
                                            "default_us": round(hand[n] * 1e6, 3),
                                            "candidates_us": {k: round(v[1] * 1e6, 3) for k, v in results.items()},
                                            "cpu": target.resolved_tvm_target().get("mcpu", ""),
                                            "measured_on": measurer.where})
        tuned[n] = best[n][0]
    return tuned


def schedules_for(funcs: dict[str, tvm.tirx.PrimFunc], store: TuningStore) -> dict[str, dict]:
    """{kernel: schedule} from the store; kernels without a record are left out (hand schedule)."""
    out = {}
    for n, f in funcs.items():
        sched = store.schedule(kernel_key(n, f))
        if sched is not None:
            out[n] = sched
    return out
