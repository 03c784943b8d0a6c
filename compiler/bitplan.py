"""Expert-wise bitwidth adaptation (EdgeMoE §4): choose a bitwidth per expert from its measured
sensitivity so the model's loss stays within a tolerance while the expert bytes shrink.

Loss is the relative increase of perplexity over the float model, measured with the NumPy
reference on calibration tokens (the search) and on tokens the search never saw (the check).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..models import Expert, MoEModel
from ..evaluate import WINDOW, perplexity_reference, token_nll, windows
from ..models.reference import forward_sequence
from .quantize import DEFAULT_GROUP, DEFAULT_TRUNK_BITS, compiled_trunk, quantize

LEVELS = (8, 4, 2)  # from the most to the least precise
ROUNDING = "searched-scales/gptq-1"  # part of the sensitivity cache key: change it when rounding.py rounds differently


class ToleranceError(ValueError):
    """Even the most precise bitwidth loses more than the tolerance."""


def mean_nll(model: MoEModel, tokens: np.ndarray) -> float:
    return perplexity_reference(model, tokens)["nll"]


class PlanEvaluator:
    """Scores bit plans against the float model: dequantized experts are computed once per (expert,
    bitwidth) and reused; the trunk is quantized as the artifact will store it (`trunk_bits`), so
    the loss measured is the artifact's."""

    def __init__(self, model: MoEModel, tokens: np.ndarray, group: int = DEFAULT_GROUP,
                 trunk_bits: int = DEFAULT_TRUNK_BITS, layout: str = "rows", moments=None):
        self.model, self.tokens, self.group, self.trunk_bits, self.layout = model, tokens, group, trunk_bits, layout
        self.moments = moments  # profile.ExpertMoments: experts rounded against calibration inputs
        self._trunk = compiled_trunk(model, trunk_bits, group, layout)
        self._experts: dict[tuple[int, int, int], Expert] = {}
        self.float_nll = mean_nll(model, tokens)
        self.evaluations = 0

    def expert(self, layer: int, idx: int, bits: int) -> Expert:
        key = (layer, idx, bits)
        if key not in self._experts:
            e = self.model.layers[layer].experts[idx]
            grams = self.moments.grams(layer, idx) if self.moments is not None else (None,) * 3
            self._experts[key] = Expert(*(quantize(w, bits, self.group, gram=g).dequantize()
                                          for w, g in zip((e.w_gate, e.w_up, e.w_down), grams)))
        return self._experts[key]

    def model_for(self, plan) -> MoEModel:
        layers = [replace(l, experts=[self.expert(li, ei, int(plan[li][ei])) for ei in range(len(l.experts))])
                  for li, l in enumerate(self._trunk.layers)]
        return replace(self._trunk, layers=layers)

    def loss(self, plan, tokens: np.ndarray | None = None) -> float:
        """Relative perplexity increase of the plan over the float model."""
        self.evaluations += 1
        if tokens is None:
            return math.exp(mean_nll(self.model_for(plan), self.tokens) - self.float_nll) - 1.0
        return math.exp(mean_nll(self.model_for(plan), tokens) - mean_nll(self.model, tokens)) - 1.0

    def layer_inputs(self, plan) -> list[list[np.ndarray]]:
        """Per window of the search tokens, the residual stream entering each layer under `plan`."""
        out = []
        for w in windows(self.tokens, WINDOW):
            trace: dict = {}
            forward_sequence(self.model_for(plan), w, trace)
            out.append([trace["embed"]] + trace["layer_out"][:-1])
        return out

    def loss_from(self, plan, layer: int, inputs: list[list[np.ndarray]]) -> float:
        """loss(plan), for a plan that equals the one `inputs` (layer_inputs()) came from in every
        layer before `layer`: those layers' output is taken from `inputs`, not recomputed (same
        arithmetic, so the same value; a sensitivity table runs 7/12 of the layers on average)."""
        self.evaluations += 1
        model, total, count = self.model_for(plan), 0.0, 0
        for w, entering in zip(windows(self.tokens, WINDOW), inputs):
            logits, _ = forward_sequence(model, w, first_layer=layer, hidden=entering[layer])
            total += float(token_nll(logits[:-1], w[1:]).sum())
            count += len(w) - 1
        return math.exp(total / count - self.float_nll) - 1.0


def uniform(model: MoEModel, bits: int) -> list[list[int]]:
    return [[bits] * model.config.num_experts for _ in range(model.config.num_layers)]


def sensitivity(ev: PlanEvaluator, high: int, low: int, cache_dir: Path | None = None) -> np.ndarray:
    """[layers, experts]: loss increase when that expert alone drops from `high` to `low` bits (the
    paper's procedure), cached on disk by model, calibration tokens and bitwidths."""
    cfg = ev.model.config
    key = hashlib.sha256(
        ev.tokens.tobytes() + ev.model.embed[:8].tobytes() + ev.model.layers[-1].experts[-1].w_down[:4].tobytes()
        + f"{high},{low},{ev.group},{ev.trunk_bits},{ev.layout},{ROUNDING}".encode()
        + (b"" if ev.moments is None else ev.moments.rows.tobytes() + ev.moments.down[-1, -1, :4].tobytes())
    ).hexdigest()[:24]
    path = Path(cache_dir) / f"sensitivity-{key}.json" if cache_dir else None
    if path and path.is_file():
        return np.array(json.loads(path.read_text()))
    base = uniform(ev.model, high)
    base_loss = ev.loss(base)
    inputs = ev.layer_inputs(base)
    out = np.zeros((cfg.num_layers, cfg.num_experts))
    for l in range(cfg.num_layers):
        for e in range(cfg.num_experts):
            plan = [row[:] for row in base]
            plan[l][e] = low
            out[l, e] = ev.loss_from(plan, l, inputs) - base_loss
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out.tolist()))
    return out


def _lower_while_within(ev: PlanEvaluator, plan, order: list[tuple[int, int]], low: int, tolerance: float):
    """The paper's search: the K least sensitive experts (in `order`) at `low`, the largest K whose
    calibration loss stays within the tolerance (binary search; loss grows with K)."""
    def with_k(k):
        p = [row[:] for row in plan]
        for l, e in order[:k]:
            p[l][e] = low
        return p

    lo, hi = 0, len(order)  # loss(with_k(lo)) is within tolerance
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ev.loss(with_k(mid)) <= tolerance:
            lo = mid
        else:
            hi = mid - 1
    return with_k(lo), lo


@dataclass
class BitPlan:
    plan: list[list[int]]
    tolerance: float
    calibration_loss: float
    heldout_loss: float
    average_bits: float
    steps: list[str] = field(default_factory=list)

    @property
    def met(self) -> bool:
        return self.heldout_loss <= self.tolerance

    def to_dict(self) -> dict:
        return {"tolerance": self.tolerance, "met": self.met, "calibration_loss": self.calibration_loss,
                "heldout_loss": self.heldout_loss, "average_bits": self.average_bits, "plan": self.plan,
                "steps": self.steps}


def _descend(ev: PlanEvaluator, high: int, tolerance: float, cache_dir: Path | None, steps: list[str]):
    """From uniform `high`, move experts down one level at a time, least sensitive first, while the
    calibration loss stays within the tolerance."""
    plan = uniform(ev.model, high)
    for low in [b for b in LEVELS if b < high]:
        cur = min(b for row in plan for b in row)
        sens = sensitivity(ev, cur, low, cache_dir)
        order = sorted(((l, e) for l in range(len(plan)) for e in range(len(plan[0])) if plan[l][e] == cur),
                       key=lambda le: sens[le])
        plan, k = _lower_while_within(ev, plan, order, low, tolerance)
        steps.append(f"INT{cur} → INT{low}: {k} of {len(order)} experts")
        if k == 0:
            break
    return plan


def _check(ev: PlanEvaluator, plan, high: int, heldout: np.ndarray, tolerance: float, cache_dir: Path | None,
           steps: list[str]):
    """Measure the plan on the check tokens; while over the tolerance, move a quarter of the experts
    at the lowest level (the most sensitive first) one level up, towards `high`. Returns the plan
    and its check loss."""
    held = ev.loss(plan, heldout)
    while held > tolerance:
        lowest = min(b for row in plan for b in row)
        if lowest >= high:
            break
        up = min(b for b in LEVELS if b > lowest)
        at_lowest = [(l, e) for l in range(len(plan)) for e in range(len(plan[0])) if plan[l][e] == lowest]
        sens = sensitivity(ev, up, lowest, cache_dir)
        at_lowest.sort(key=lambda le: -sens[le])
        n = max(1, len(at_lowest) // 4)
        for l, e in at_lowest[:n]:
            plan[l][e] = up
        steps.append(f"check over tolerance ({100 * held:.2f}%): raised {n} experts from INT{lowest} to INT{up}")
        held = ev.loss(plan, heldout)
    return plan, held


def search_plan(model: MoEModel, calibration: np.ndarray, heldout: np.ndarray, tolerance: float,
                group: int = DEFAULT_GROUP, cache_dir: Path | None = None, log=print,
                trunk_bits: int = DEFAULT_TRUNK_BITS, layout: str = "rows", moments=None) -> BitPlan:
    """Three-level plan: the most compact uniform bitwidth within the tolerance sets the ceiling;
    then, by sensitivity, experts move down one level at a time while the loss stays within it.
    Verified on held-out tokens; if the check fails, the lowered set shrinks until it passes, and
    if even the uniform ceiling fails the check, the search starts again from the next level up
    (so a 1% plan can mix INT8 and INT4 when uniform INT4 is just over 1%). With `moments`
    (profile.ExpertMoments, gathered on the search's tokens) experts are rounded as the compiler
    will round them."""
    ev = PlanEvaluator(model, calibration, group, trunk_bits, layout, moments)
    steps = []
    uniform_loss = {b: ev.loss(uniform(model, b)) for b in LEVELS}
    steps += [f"uniform INT{b}: calibration loss {100 * uniform_loss[b]:+.2f}%" for b in LEVELS]
    ceilings = sorted(b for b in LEVELS if uniform_loss[b] <= tolerance)
    if not ceilings:
        raise ToleranceError(f"even uniform INT{LEVELS[0]} loses {100 * uniform_loss[LEVELS[0]]:.2f}% perplexity on "
                             f"calibration text, over the tolerance {100 * tolerance:.2f}% by "
                             f"{100 * (uniform_loss[LEVELS[0]] - tolerance):.2f} points")
    ceilings += [b for b in sorted(LEVELS) if b > ceilings[-1]]  # fall-backs when a check fails
    for high in ceilings:
        plan, held = _check(ev, _descend(ev, high, tolerance, cache_dir, steps), high, heldout, tolerance,
                            cache_dir, steps)
        if held <= tolerance:
            break
        steps.append(f"check over tolerance even at uniform INT{high}: {100 * held:.2f}% "
                     f"(+{100 * (held - tolerance):.2f} points)" + ("" if high == LEVELS[0] else "; starting again "
                                                                     "from the next level up"))
    cal = ev.loss(plan)
    avg = float(np.mean(plan))
    steps.append(f"{ev.evaluations} plan evaluations")
    for s in steps:
        log(s)
    return BitPlan(plan, tolerance, cal, held, avg, steps)
