"""The bit-plan search for a model too large to hold in RAM (or to measure expert by expert): the
sensitivities estimated in one pass over the calibration tokens, and candidate plans scored together
in one pass over the search and check tokens, both layer by layer (layer_pass.py), reading each
expert once per pass.

Measured sensitivity (bitplan.sensitivity) runs the search tokens through the model once per expert
and bitwidth: 3072 forward passes for a 16-layer, 64-expert model, each holding the whole model in
RAM. The estimate here asks instead what rounding an expert does to the layer's output where the
router sends tokens to it: per expert and bitwidth, the squared change of the expert's weighted
output on its routed calibration tokens, relative to the squared norm of the residual stream it
is added to (the next norm divides by that stream's scale, so the same error weighs less on a
larger stream), summed over tokens and divided by their number. An expert the router never picks
costs nothing; one that carries many tokens with a large gate weight costs in proportion.

Plans are then scored for real: every candidate of plan_path() is a stream of its own through the
same layer-by-layer pass (the float model one more), its experts rounded at the plan's bits, and
each stream's perplexity on the search and the check tokens comes out at the end. Experts are rounded
here without calibration (a searched scale per group): cheaper than GPTQ at every bitwidth, and it
errs on the safe side, since the compile's calibrated rounding loses less (docs/BENCHMARKS.md §5).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..models import Expert, MoEModel, read_stored
from ..models.perplexity import token_nll
from ..models.reference import final_logits, routed_expert_hidden
from ..models.stored_tensor import LazyTensor, materialize
from .layer_pass import LayerPass
from .progress import track
from .quantize import grid_at, quantize

# Candidate plans scored in one pass, the float model aside: enough that neighbours on the path
# differ by ~0.5 bits on average over INT8…INT2, few enough that a pass costs a few forward passes.
CANDIDATES = 12


@dataclass
class LevelTask:
    """One expert's matrices (arrays or LazyTensors) to round at each of `levels` (INT4 on `int4_grid`)."""

    layer: int
    expert: int
    weights: tuple
    levels: tuple[int, ...]
    group: int
    int4_grid: str = "half"


def round_at_levels(task: LevelTask) -> dict[int, Expert]:
    """bits → the expert with its matrices rounded there (scale search, no calibration; stored levels
    the bitwidth holds, a GGUF's Q8_0 / Q4_0 blocks, as they are) and dequantized: what the
    artifact's kernels compute with, up to the calibrated rounding."""
    # read once, unless stored as levels (quantize then takes them, or reads for the other bitwidths)
    weights = [w if isinstance(w, LazyTensor) and w.level_bounds(task.group) is not None else materialize(w)
               for w in task.weights]
    return {bits: Expert(*(None if w is None else
                           quantize(w, bits, task.group, grid=grid_at(bits, task.int4_grid)).dequantize()
                           for w in weights))
            for bits in task.levels}


def _level_tasks(model: MoEModel, levels_of, group: int, int4_grid: str):
    for l, layer in enumerate(model.moe_layers):
        for e, expert in enumerate(layer.experts):
            yield LevelTask(l, e, (expert.w_gate, expert.w_up, expert.w_down), tuple(levels_of(l, e)), group,
                            int4_grid)


def estimate_errors(trunk: MoEModel, tokens: np.ndarray, levels: tuple[int, ...], group: int, pool,
                    progress=None, int4_grid: str = "half") -> dict[int, np.ndarray]:
    """bits → [expert layers, experts]: the estimated error of each expert rounded to those bits
    (module docstring; INT4 on `int4_grid`), on `tokens` run through `trunk` (the model as the
    artifact computes it, experts still float) layer by layer. `pool`: an ExpertPool that rounds
    the experts."""
    cfg = trunk.config
    errors = {b: np.zeros((cfg.num_moe_layers, cfg.num_experts)) for b in levels}
    calibration = LayerPass(trunk, tokens)
    rounded = pool.run(_level_tasks(trunk, lambda l, e: levels, group, int4_grid), work=round_at_levels)
    for layer in track(progress, calibration.layers(), "bit plans: estimating expert sensitivity",
                       total=cfg.num_moe_layers, unit="layer"):
        l = layer.moe_index
        for e, stored in enumerate(layer.layer.experts):
            expert = read_stored(stored)
            at = next(rounded)
            routed = layer.expert_inputs(e, expert)
            for r in routed:
                xn = layer.ffn_in[r.window][r.rows]
                weight = layer.weights[r.window][r.rows, r.slot][:, None]
                scale = (layer.attended[r.window][r.rows] ** 2).sum(axis=1)
                exact = r.hidden @ expert.w_down.T
                for b, q in at.items():
                    moved = routed_expert_hidden(layer.layer, cfg, e, xn, trunk.expert_act_group, q) @ q.w_down.T
                    errors[b][l, e] += float((((weight * (moved - exact)) ** 2).sum(axis=1) / scale).sum())
            layer.add(e, expert, routed)
    return {b: err / len(tokens) for b, err in errors.items()}


def plan_nlls(model: MoEModel, trunk: MoEModel, plans: list, texts: list[np.ndarray], group: int, pool,
              progress=None, int4_grid: str = "half") -> np.ndarray:
    """[plans, texts]: mean negative log-likelihood of each text under each plan, a plan of bits per
    [expert layer][expert] through `trunk` (the model as the artifact computes it), or None: `model`
    itself, all float. Every plan is a stream of one layer-by-layer pass that reads each expert once
    and rounds it once per bitwidth any plan gives it."""
    cfg = trunk.config
    reads: dict = {}
    passes = [LayerPass(model, texts) if p is None else LayerPass(trunk, texts, reads=reads) for p in plans]
    rounded = pool.run(_level_tasks(trunk, lambda l, e: sorted({p[l][e] for p in plans if p is not None}), group,
                                    int4_grid), work=round_at_levels)
    layers = [p.layers() for p in passes]
    for m in track(progress, range(cfg.num_moe_layers), f"bit plans: scoring {len(plans)} plans", unit="layer"):
        streams = [next(g) for g in layers]
        for e, stored in enumerate(streams[0].layer.experts):
            at = next(rounded)
            expert = read_stored(stored) if any(p is None for p in plans) else None
            for plan, layer in zip(plans, streams):
                weights = expert if plan is None else at[plan[m][e]]
                layer.add(e, weights, layer.expert_inputs(e, weights))
    for g in layers:
        next(g, None)  # runs the dense layers after the last expert layer, if any
    heads = {id(m): read_stored(_head_only(m)) for m in (model, trunk)}  # the float stream's is the float head
    out = np.zeros((len(plans), len(texts)))
    for i, p in enumerate(passes):
        total, count = np.zeros(len(texts)), np.zeros(len(texts))
        for w, piece, x in zip(p.windows, p.piece, p.output):
            if len(w) > 1:
                total[piece] += float(token_nll(final_logits(heads[id(p.model)], x)[:-1], w[1:]).sum())
                count[piece] += len(w) - 1
        out[i] = total / np.maximum(count, 1)
    return out


def _head_only(model: MoEModel) -> MoEModel:
    """The model with only what final_logits reads (norm, LM head), so reading it reads nothing else."""
    from dataclasses import replace

    return replace(model, layers=[], embed=None, encoder_embed=None, decoder_position_bias=None,
                   encoder_position_bias=None)


def relative_loss(nll: float, float_nll: float) -> float:
    """The relative perplexity increase of nll over the float model's."""
    return math.exp(nll - float_nll) - 1.0


def _bits_along(start, moves) -> np.ndarray:
    """[len(moves) + 1]: the average bits of the plan after k moves."""
    plan = np.array(start, dtype=np.float64)
    saved = [0.0]
    for _, l, e, bits in moves:
        saved.append(saved[-1] + plan[l, e] - bits)
        plan[l, e] = bits
    return np.mean(start) - np.array(saved) / plan.size


def _spread(bits: np.ndarray, lo: int, hi: int, n: int) -> list[int]:
    """Up to n move counts in [lo, hi] whose plans' average bits are evenly spaced from bits[lo] to
    bits[hi], both ends included."""
    targets = np.linspace(bits[lo], bits[hi], n)
    found = {lo, hi}
    for t in targets:
        found.add(min(lo + int(np.argmax(bits[lo : hi + 1] <= t + 1e-9)), hi))
    return sorted(found)


def search_plan_estimated(model: MoEModel, trunk: MoEModel, fit: np.ndarray, search: np.ndarray, check: np.ndarray,
                          tolerance: float | None, max_bits: float | None, group: int, pool, log=print,
                          progress=None, int4_grid: str = "half"):
    """bitplan.search_plan's plan, for a model read layer by layer: sensitivities estimated on the
    `fit` tokens (estimate_errors), the path of plan_path() through them, and plans along it scored
    together (plan_nlls) on the search and the check tokens: CANDIDATES evenly spaced in average bits,
    then as many again between the most compact that stays within the tolerance on both and the next.
    The plan is the most compact scored one within the tolerance on both texts (with `max_bits`, at most
    that many bits). Loss is measured against `model`, all float; `trunk` is the model as the artifact
    computes it, experts still float; INT4 experts on `int4_grid`."""
    from .bitplan import BASE, LEVELS, BitPlan, ToleranceError, _plan_at, plan_path

    if tolerance is None and max_bits is None:
        raise ValueError("a bit plan search needs a tolerance, a bits target, or both")
    if max_bits is not None and max_bits < min(LEVELS):
        raise ValueError(f"an average of {max_bits} bits is below the narrowest expert bitwidth INT{min(LEVELS)}")
    errors = estimate_errors(trunk, fit, LEVELS, group, pool, progress, int4_grid)
    start, moves = plan_path({b: errors[b] - errors[BASE] for b in LEVELS if b != BASE})
    bits = _bits_along(start, moves)
    steps = [f"sensitivities estimated on {len(fit)} calibration tokens; {len(moves)} moves from {bits[0]:.2f} to "
             f"{bits[-1]:.2f} average bits, by estimated loss per bit saved"]
    lowest = 0 if max_bits is None else int(np.argmax(bits <= max_bits + 1e-9))
    scored: dict[int, tuple[float, float]] = {}

    def score(ks: list[int]) -> None:
        ks = [k for k in ks if k not in scored]
        nll = plan_nlls(model, trunk, [None] + [_plan_at(start, moves, k) for k in ks], [search, check], group,
                        pool, progress, int4_grid)
        for k, row in zip(ks, nll[1:]):
            scored[k] = (relative_loss(row[0], nll[0, 0]), relative_loss(row[1], nll[0, 1]))
            steps.append(f"{k} moves, {bits[k]:.2f} bits: loss {100 * scored[k][0]:+.2f}% on search tokens, "
                         f"{100 * scored[k][1]:+.2f}% on check tokens")

    def within(k: int) -> bool:
        return tolerance is None or max(scored[k]) <= tolerance

    score(_spread(bits, lowest, len(moves), CANDIDATES) if tolerance is not None else [lowest])
    if tolerance is not None:
        if scored[lowest][0] > tolerance and lowest == 0:
            raise ToleranceError(f"even the most precise plan ({bits[0]:.2f} bits) loses {100 * scored[0][0]:.2f}% "
                                 f"perplexity on the search text, over the tolerance {100 * tolerance:.2f}% by "
                                 f"{100 * (scored[0][0] - tolerance):.2f} points")
        good = max((k for k in scored if within(k)), default=lowest)
        beyond = min((k for k in scored if k > good), default=good)
        if within(good) and beyond - good > 1:
            score(_spread(bits, good, beyond, CANDIDATES + 2)[1:-1])
    k = max((k for k in scored if within(k)), default=lowest)
    found = BitPlan(_plan_at(start, moves, k), tolerance, max_bits, scored[k][0], scored[k][1], float(bits[k]), steps)
    steps.append(f"{k} moves: {found.average_bits:.2f} bits, loss {100 * found.search_loss:+.2f}% on search "
                 f"tokens, {100 * found.check_loss:+.2f}% on check tokens ({len(scored)} plans scored, experts "
                 "rounded without calibration: the compile's calibrated rounding loses less)")
    if not found.met:
        steps.append(f"over the tolerance even at {found.average_bits:.2f} bits: {100 * max(scored[k]):.2f}%")
    for line in steps:
        log(line)
    return found
