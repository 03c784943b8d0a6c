"""Expert-wise bitwidth adaptation (EdgeMoE §4): choose a bitwidth per expert (INT8/4/3/2) from its
measured sensitivity so the model's loss stays within a tolerance, or the experts within a size,
while the expert bytes shrink.

Loss is the relative increase of perplexity over the float model, measured with the NumPy
reference on search tokens and on check tokens the search never saw. Both should be text the
model was not trained on (the compiler's --search-text): a model is more fragile on text it has
memorised, and a search scored there favours experts by damage that unseen text does not see.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..models import Expert, MoEModel
from ..models.perplexity import WINDOW, perplexity_reference, token_nll, windows
from ..models.reference import forward_sequence
from .progress import stage, track
from .quantize import DEFAULT_GROUP, DEFAULT_TRUNK_BITS, compiled_trunk, grid_at, quantize

LEVELS = (8, 4, 3, 2)  # from the most to the least precise
ROUNDING = "searched-scales/gptq-1"  # part of the sensitivity cache key: change it when rounding.py rounds differently


class ToleranceError(ValueError):
    """Even the most precise bitwidth loses more than the tolerance."""


def mean_nll(model: MoEModel, tokens: np.ndarray) -> float:
    return perplexity_reference(model, tokens)["nll"]


class PlanEvaluator:
    """Scores bit plans against the float model: dequantized experts are computed once per (expert,
    bitwidth) and reused; the trunk is quantized as the artifact will store it (`trunk_bits`; INT4
    matrices on `int4_grid`, the experts' too), so the loss measured is the artifact's."""

    def __init__(self, model: MoEModel, tokens: np.ndarray, group: int = DEFAULT_GROUP,
                 trunk_bits: int = DEFAULT_TRUNK_BITS, layout: str = "rows", moments=None, int4_grid: str = "half"):
        self.model, self.tokens, self.group, self.trunk_bits, self.layout = model, tokens, group, trunk_bits, layout
        self.moments = moments  # profile.ExpertMoments: experts rounded against calibration inputs
        self.int4_grid = int4_grid
        self._trunk = compiled_trunk(model, trunk_bits, group, layout, int4_grid)
        self._experts: dict[tuple[int, int, int], Expert] = {}
        self.float_nll = mean_nll(model, tokens)
        self.evaluations = 0

    def expert(self, layer: int, idx: int, bits: int) -> Expert:
        key = (layer, idx, bits)
        if key not in self._experts:
            e = self.model.moe_layers[layer].experts[idx]
            grams = self.moments.grams(layer, idx) if self.moments is not None else (None,) * 3
            self._experts[key] = Expert(*(quantize(w, bits, self.group, gram=g, grid=grid_at(bits, self.int4_grid))
                                          .dequantize()
                                          for w, g in zip((e.w_gate, e.w_up, e.w_down), grams)))
        return self._experts[key]

    def model_for(self, plan) -> MoEModel:
        layers = list(self._trunk.layers)
        for m, li in enumerate(self.model.config.moe_layer_ids):
            layers[li] = replace(layers[li], experts=[self.expert(m, ei, int(plan[m][ei]))
                                                      for ei in range(len(layers[li].experts))])
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
        expert layer before expert layer `layer`: those layers' output is taken from `inputs`, not recomputed (same
        arithmetic, so the same value; a sensitivity table runs 7/12 of the layers on average)."""
        self.evaluations += 1
        model, total, count = self.model_for(plan), 0.0, 0
        layer = self.model.config.moe_layer_ids[layer]  # the decoder layer holding those experts
        for w, entering in zip(windows(self.tokens, WINDOW), inputs):
            logits, _ = forward_sequence(model, w, first_layer=layer, hidden=entering[layer])
            total += float(token_nll(logits[:-1], w[1:]).sum())
            count += len(w) - 1
        return math.exp(total / count - self.float_nll) - 1.0


def uniform(model: MoEModel, bits: int) -> list[list[int]]:
    return [[bits] * model.config.num_experts for _ in range(model.config.num_moe_layers)]


def sensitivity(ev: PlanEvaluator, high: int, low: int, cache_dir: Path | None = None, progress=None) -> np.ndarray:
    """[layers, experts]: loss increase when that expert alone drops from `high` to `low` bits (the
    paper's procedure), cached on disk by model, calibration tokens and bitwidths. `progress`: a
    progress factory (compiler/progress.py) counting the experts measured."""
    cfg = ev.model.config
    key = hashlib.sha256(
        ev.tokens.tobytes() + ev.model.embed[:8].tobytes() + ev.model.moe_layers[-1].experts[-1].w_down[:4].tobytes()
        + f"{high},{low},{ev.group},{ev.trunk_bits},{ev.layout},{ev.int4_grid},{ROUNDING}".encode()
        + (b"" if ev.moments is None else ev.moments.rows.tobytes() + ev.moments.down[-1, -1, :4].tobytes())
    ).hexdigest()[:24]
    path = Path(cache_dir) / f"sensitivity-{key}.json" if cache_dir else None
    if path and path.is_file():
        return np.array(json.loads(path.read_text()))
    base = uniform(ev.model, high)
    base_loss = ev.loss(base)
    inputs = ev.layer_inputs(base)
    out = np.zeros((cfg.num_moe_layers, cfg.num_experts))
    each = [(l, e) for l in range(cfg.num_moe_layers) for e in range(cfg.num_experts)]
    for l, e in track(progress, each, f"sensitivity INT{high}→INT{low}", unit="expert"):
        plan = [row[:] for row in base]
        plan[l][e] = low
        out[l, e] = ev.loss_from(plan, l, inputs) - base_loss
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out.tolist()))
    return out


SENSITIVITIES = ("auto", "measured", "estimated")
# "auto" measures sensitivities (one forward pass of the search tokens per expert and bitwidth, the
# model in RAM) up to this many expert parameters, and estimates them above (plan_pass.py): the
# bundled models' searches take minutes measured; a 1.9 B-parameter model's would take hours.
MEASURED_UP_TO = 100_000_000


def sensitivity_method(cfg, choice: str = "auto") -> str:
    """"measured" or "estimated" for a model of config `cfg` (SENSITIVITIES, above)."""
    if choice not in SENSITIVITIES:
        raise ValueError(f"unknown sensitivity method {choice!r}; use one of {', '.join(SENSITIVITIES)}")
    if choice != "auto":
        return choice
    per_expert = (2 if cfg.expert_activation == "relu" else 3) * cfg.hidden_size * cfg.expert_intermediate
    return "measured" if cfg.num_moe_layers * cfg.num_experts * per_expert <= MEASURED_UP_TO else "estimated"


def split_tokens(calibration: np.ndarray, search: np.ndarray | None = None):
    """(rounding, search, check) tokens for a search: the search text (default: the calibration
    text) cut 3/4 for the search and 1/4 for the check, and the calibration tokens the experts are
    rounded against, less any the check uses (the check must be unseen by the rounding too)."""
    text = calibration if search is None else search
    cut = len(text) * 3 // 4
    return (calibration[:cut] if search is None else calibration), text[:cut], text[cut:]


BASE = 4  # sensitivities are measured one expert at a time with every other expert here (the paper's middle level)


def sensitivities(ev: PlanEvaluator, cache_dir: Path | None = None, progress=None) -> dict[int, np.ndarray]:
    """Bits → [layers, experts] loss change when that expert alone moves from BASE to those bits."""
    return {b: sensitivity(ev, BASE, b, cache_dir, progress) for b in LEVELS if b != BASE}


def plan_path(sens: dict[int, np.ndarray]) -> tuple[list[list[int]], list[tuple[float, int, int, int]]]:
    """The plans worth considering, from the most precise to the most compact: (start, moves).

    Taking the measured sensitivities as additive, the plan that minimises loss + λ·bits for a
    given λ puts each expert on the lower convex hull of its (bits, loss) points; as λ grows,
    experts step down their hulls one move at a time, and every bit saved costs the least loss
    there is left to pay for it. `start` (λ = 0) has each expert at its least-loss bitwidth (the
    fewer bits on a tie); `moves` are (loss per bit saved, layer, expert, new bits) in the order λ
    reaches them. The paper's "K least sensitive experts to the low bitwidth" is this path with
    two levels."""
    layers, experts = next(iter(sens.values())).shape
    start = [[0] * experts for _ in range(layers)]
    moves = []
    for l in range(layers):
        for e in range(experts):
            points = sorted(((b, 0.0 if b == BASE else float(sens[b][l, e])) for b in LEVELS), key=lambda p: p[0])
            bits, loss = min(points, key=lambda p: (p[1], p[0]))
            start[l][e] = bits
            while True:
                below = [(q_loss - loss) / (bits - q) for q, q_loss in points if q < bits]
                if not below:
                    break
                slope = min(below)
                bits, loss = min(((q, q_loss) for q, q_loss in points
                                  if q < bits and (q_loss - loss) / (bits - q) == slope), key=lambda p: p[0])
                moves.append((slope, l, e, bits))
    moves.sort(key=lambda m: m[0])  # stable: one expert's moves keep their order (their slopes only grow)
    return start, moves


def _plan_at(start, moves, k: int) -> list[list[int]]:
    plan = [row[:] for row in start]
    for _, l, e, bits in moves[:k]:
        plan[l][e] = bits
    return plan


@dataclass
class BitPlan:
    plan: list[list[int]]
    tolerance: float | None
    max_bits: float | None
    search_loss: float
    check_loss: float
    average_bits: float
    steps: list[str] = field(default_factory=list)

    @property
    def met(self) -> bool:
        return ((self.tolerance is None or self.check_loss <= self.tolerance)
                and (self.max_bits is None or self.average_bits <= self.max_bits + 1e-9))

    def to_dict(self) -> dict:
        return {"tolerance": self.tolerance, "max_bits": self.max_bits, "met": self.met,
                "search_loss": self.search_loss, "check_loss": self.check_loss,
                "average_bits": self.average_bits, "plan": self.plan, "steps": self.steps}

    @classmethod
    def from_dict(cls, d: dict) -> "BitPlan":
        return cls(d["plan"], d["tolerance"], d["max_bits"], d["search_loss"], d["check_loss"], d["average_bits"],
                   d["steps"])


def search_plan(model: MoEModel, search: np.ndarray, check: np.ndarray, tolerance: float | None = None,
                group: int = DEFAULT_GROUP, cache_dir: Path | None = None, log=print,
                trunk_bits: int = DEFAULT_TRUNK_BITS, layout: str = "rows", moments=None,
                max_bits: float | None = None, progress=None, int4_grid: str = "half") -> BitPlan:
    """A per-expert plan over LEVELS along plan_path(): with `tolerance`, the most compact plan whose
    loss on the search tokens stays within it (binary search along the path; loss grows along it),
    then measured on the check tokens, stepping back towards precision while that fails; with
    `max_bits` (average bits per expert weight), the first plan on the path that small, and with
    both, the more compact of the two. With `moments` (profile.ExpertMoments, gathered on
    calibration tokens that exclude the check's) experts are rounded as the compiler will round them.
    `progress`: a progress factory (compiler/progress.py) told of each measurement loop. INT4 on
    `int4_grid`, as the compile stores it."""
    if tolerance is None and max_bits is None:
        raise ValueError("a bit plan search needs a tolerance, a bits target, or both")
    if max_bits is not None and max_bits < min(LEVELS):
        raise ValueError(f"an average of {max_bits} bits is below the narrowest expert bitwidth INT{min(LEVELS)}")
    with stage(progress, "bit plans: scoring the float model"):
        ev = PlanEvaluator(model, search, group, trunk_bits, layout, moments, int4_grid)
    steps = [f"uniform INT{b}: loss {100 * ev.loss(uniform(model, b)):+.2f}% on search tokens"
             for b in track(progress, LEVELS, "bit plans: uniform plans", unit="plan")]
    start, moves = plan_path(sensitivities(ev, cache_dir, progress))
    steps.append(f"{len(moves)} moves from {np.mean(start):.2f} to {np.mean(_plan_at(start, moves, len(moves))):.2f} "
                 "average bits, by loss per bit saved")
    lowest = 0  # the check never steps back past this move (the bits target)
    if max_bits is not None:
        lowest = next(k for k in range(len(moves) + 1) if np.mean(_plan_at(start, moves, k)) <= max_bits + 1e-9)
    k = lowest
    if tolerance is not None:
        if ev.loss(start) > tolerance:
            raise ToleranceError(f"even the most precise plan ({np.mean(start):.2f} bits) loses "
                                 f"{100 * ev.loss(start):.2f}% perplexity on the search text, over the tolerance "
                                 f"{100 * tolerance:.2f}% by {100 * (ev.loss(start) - tolerance):.2f} points")
        lo, hi = 0, len(moves)  # loss(plan at lo) is within tolerance
        # a binary search over len(moves) + 1 plans halves them at most len(moves).bit_length() times
        for _ in track(progress, range(len(moves).bit_length()), "bit plans: searching the path", unit="plan"):
            if lo >= hi:
                continue  # found: the rest of the bar's steps are empty
            mid = (lo + hi + 1) // 2
            if ev.loss(_plan_at(start, moves, mid)) <= tolerance:
                lo = mid
            else:
                hi = mid - 1
        steps.append(f"within {100 * tolerance:.2f}% on the search tokens: {lo} moves")
        k = max(lo, lowest)
    with stage(progress, "bit plans: checking on unseen tokens"):
        checked = ev.loss(_plan_at(start, moves, k), check)
        while tolerance is not None and checked > tolerance and k > lowest:
            back = max(1, (k - lowest) // 8)
            steps.append(f"check over tolerance ({100 * checked:.2f}%) at {k} moves: {back} back")
            k -= back
            checked = ev.loss(_plan_at(start, moves, k), check)
        plan = _plan_at(start, moves, k)
        found = BitPlan(plan, tolerance, max_bits, ev.loss(plan), checked, float(np.mean(plan)), steps)
    steps.append(f"{k} moves: {found.average_bits:.2f} bits, loss {100 * found.search_loss:+.2f}% on search "
                 f"tokens, {100 * checked:+.2f}% on check tokens ({ev.evaluations} plan evaluations)")
    if not found.met:
        steps.append(f"check over tolerance even at {found.average_bits:.2f} bits: {100 * checked:.2f}% "
                     f"(+{100 * (checked - tolerance):.2f} points)")
    for line in steps:
        log(line)
    return found
