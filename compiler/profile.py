"""Profiling on calibration text: expert activation traces, and the tables the runtime's
predictor and eviction policy read (stored in trunk.bin as profile.* tensors); the moments of each
expert's inputs, which the quantizer rounds against (rounding.py)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..models import MoEModel, read_stored
from ..models.reference import norm
from .layer_pass import WINDOW, LayerPass, grams
from .progress import track

# The fit corrects the next layer's own router and is pulled towards it: penalty RIDGE per
# calibration token on the correction, so a short calibration text changes the router little.
RIDGE = 0.5


@dataclass
class RoutingProfile:
    selected: np.ndarray  # [tokens, expert layers, top_k] experts chosen, tokens in text order
    num_experts: int
    # [layers, experts, 2 * hidden + 1]: per layer, a linear map to that layer's router logits from
    # what the runtime has when it predicts that layer: the current state (the previous layer's
    # output; layer 0: the token's embedding) normalised with the layer's ffn norm (weights
    # [:hidden]), and the MoE input the layer saw at the previous token (zeros at the first;
    # weights [hidden:2·hidden]); then the bias
    fitted_router: np.ndarray | None = None
    # [layers, experts, 2 * hidden + 1]: the same for a guess two layers ahead (em_params.prefetch_layers
    # ≥ 2), from the state entering the layer before (layer 0: its own map, never used that early)
    fitted_ahead: np.ndarray | None = None

    @property
    def frequency(self) -> np.ndarray:
        """[layers, experts]: fraction of tokens that route to each expert."""
        t, layers, _ = self.selected.shape
        f = np.zeros((layers, self.num_experts), np.float32)
        for l in range(layers):
            np.add.at(f[l], self.selected[:, l].ravel(), 1.0)
        return f / t

    def path_table(self) -> np.ndarray:
        """[layers, experts, experts]: entry [l, j, e] = P(e chosen at the next layer | j chosen at layer l).
        The layer after the last is the first layer of the next token."""
        t, layers, k = self.selected.shape
        E = self.num_experts
        counts = np.zeros((layers, E, E), np.float64)
        for l in range(layers):
            cur = self.selected[:-1, l] if l == layers - 1 else self.selected[:, l]
            nxt = self.selected[1:, 0] if l == layers - 1 else self.selected[:, l + 1]
            for a in range(k):
                for b in range(k):
                    np.add.at(counts[l], (cur[:, a], nxt[:, b]), 1.0)
        seen = counts.sum(axis=2, keepdims=True) / k
        return (counts / np.maximum(seen, 1.0)).astype(np.float32)

    def coactivation_order(self) -> list[list[int]]:
        """Per layer, its experts in the order experts.bin stores them: a chain that sets experts
        often chosen together side by side, from the most chosen expert on, each next one the
        unplaced expert chosen most often with the last placed (ties: the more often chosen, then
        the lower index). A layer's misses, and a prediction's experts, are read together; the more
        of them lie next to each other, the fewer requests they take (runtime_c/src/loader.c).
        Replayed on WikiText-2 test with an LRU cache of olmoe-mini, a quarter of its experts: 0.79
        requests per read against 0.92 in index order (docs/BENCHMARKS.md §3)."""
        t, layers, _ = self.selected.shape
        E = self.num_experts
        order = []
        for l in range(layers):
            chosen = np.zeros((t, E), np.float64)
            np.put_along_axis(chosen, self.selected[:, l].astype(np.int64), 1.0, axis=1)
            together = chosen.T @ chosen
            uses = np.diag(together).copy()
            np.fill_diagonal(together, 0.0)
            chain = [int(np.argmax(uses))]
            free = np.ones(E, bool)
            free[chain[0]] = False
            for _ in range(E - 1):
                # lexicographic (together, uses, -index) among the unplaced
                key = np.where(free, together[chain[-1]] * (uses.max() + 1.0) * E + uses * E + (E - 1 - np.arange(E)),
                               -1.0)
                nxt = int(np.argmax(key))
                chain.append(nxt)
                free[nxt] = False
            order.append(chain)
        return order


def tokenize_file(tokenizer_path: Path, text_path: Path, max_tokens: int) -> np.ndarray:
    from tokenizers import Tokenizer

    if not Path(text_path).is_file():
        raise FileNotFoundError(f"calibration text {text_path} not found")
    if not Path(tokenizer_path).is_file():
        raise FileNotFoundError(f"{tokenizer_path} not found: calibration needs the model's tokenizer.json")
    tok = Tokenizer.from_file(str(tokenizer_path))
    # read only as much text as the token budget needs (≈ 4 characters per token, with margin)
    with open(text_path, encoding="utf-8", errors="replace") as f:
        text = f.read(max_tokens * 8)
    return np.asarray(tok.encode(text).ids[:max_tokens], dtype=np.int64)


def profile_routing(model: MoEModel, tokens: np.ndarray, window: int = WINDOW, progress=None) -> RoutingProfile:
    """Routes every calibration token through the float model, in windows of `window` tokens (each
    a fresh context), and fits the fitted-router predictor: each layer's router plus a ridge
    least-squares correction, from the normalised state the runtime has one layer earlier and the
    layer's MoE input at the previous token, to that layer's router logits. The router alone on
    the earlier state misses what the layer's attention adds; that depends on the context, which
    the layer's previous input stands for (measured: docs/BENCHMARKS.md §4). A second map per layer
    does the same from the state entering the layer before, for guesses two layers ahead: the first
    map applied there names far fewer of the layer's experts (olmoe-mini layer 1 on WikiText-2 test:
    26% against 66%). Runs layer by layer (layer_pass.py), reading one expert at a time.
    `progress`: a progress factory (compiler/progress.py) counting the layers."""
    cfg = model.config
    calibration = LayerPass(model, tokens, window)
    fitted, ahead, before = [], [], None
    for layer in track(progress, calibration.layers(), "routing profile", total=cfg.num_moe_layers, unit="layer"):
        fitted.append(_fit_router(cfg, layer, layer.entering, len(tokens)))
        ahead.append(fitted[-1] if before is None else _fit_router(cfg, layer, before, len(tokens)))
        before = layer.entering
        calibration.run_experts(layer)
    return RoutingProfile(np.concatenate(calibration.selected), cfg.num_experts, np.stack(fitted).astype(np.float32),
                          np.stack(ahead).astype(np.float32))


def _fit_router(cfg, layer, sources: list[np.ndarray], n_tokens: int) -> np.ndarray:
    """[experts, 2 · hidden + 1]: the layer's router plus the ridge correction that maps the sources
    (per window, normalised with the layer's ffn norm) and the layer's MoE input at the previous
    token to the logits the layer computed."""
    H, E = cfg.hidden_size, cfg.num_experts
    F = 2 * H + 1
    weights = layer.layer
    gram, cross = np.zeros((F, F)), np.zeros((F, E))  # one fit's at a time: [F, F] is 134 MB at H = 2048
    for source, xn, logits in zip(sources, layer.ffn_in, layer.logits):
        z = norm(cfg, source, weights.ffn_norm, weights.ffn_norm_bias).astype(np.float64)
        previous = np.vstack([np.zeros((1, H)), xn[:-1]])
        z = np.hstack([z, previous, np.ones((len(z), 1))])
        gram += z.T @ z
        cross += z.T @ logits
    router = np.zeros((F, E))
    router[:H] = weights.router.T  # the plain next router: current state only, no bias
    # minimise |Z (router + D) - Y|^2 + RIDGE·T·|D|^2 over the correction D
    d = np.linalg.solve(gram + RIDGE * n_tokens * np.eye(F), cross - gram @ router)
    return (router + d).T


@dataclass
class ExpertMoments:
    """Per expert, the Gram matrices XᵀX of what its matrices multiply on calibration text: the
    normalised MoE input (gate and up) and the SwiGLU product (down), over the tokens routed to it."""

    gate_up: np.ndarray  # float64 [layers, experts, hidden, hidden]
    down: np.ndarray  # float64 [layers, experts, inter, inter]
    rows: np.ndarray  # [layers, experts]: calibration tokens each expert saw

    def grams(self, layer: int, expert: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The Gram matrices for (gate, up, down) of one expert."""
        return self.gate_up[layer, expert], self.gate_up[layer, expert], self.down[layer, expert]


def expert_moments(model: MoEModel, tokens: np.ndarray, window: int = WINDOW, progress=None) -> ExpertMoments:
    """Runs the calibration tokens through `model` and sums, per expert, the outer products of the
    inputs its three matrices see (as the artifact's kernels see them: with the model's activation
    rounding), layer by layer (layer_pass.py). All [layers, experts] Gram matrices at once: for
    the bit-plan search and evaluation; the streaming compile keeps one expert's (grams()).
    `progress`: a progress factory (compiler/progress.py) counting the layers."""
    cfg = model.config
    L, E, H, I = cfg.num_moe_layers, cfg.num_experts, cfg.hidden_size, cfg.expert_intermediate
    gate_up, down, rows = np.zeros((L, E, H, H)), np.zeros((L, E, I, I)), np.zeros((L, E), np.int64)
    calibration = LayerPass(model, tokens, window)
    for layer in track(progress, calibration.layers(), "calibration: expert inputs", total=L, unit="layer"):
        l = layer.moe_index
        for e, stored in enumerate(layer.layer.experts):
            expert = read_stored(stored)
            routed = layer.expert_inputs(e, expert)
            if routed:
                gate_up[l, e], down[l, e], rows[l, e] = grams(routed, layer.ffn_in, model.expert_act_group)
            layer.add(e, expert, routed)
    return ExpertMoments(gate_up, down, rows)
