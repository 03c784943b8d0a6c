"""The calibration tokens through a model one layer at a time, for the passes that need every
token's activations at a layer (expert input moments, the routing profile).

All windows advance together: a layer's attention and routing run on every window, then its experts
one after another — each read once for all tokens routed to it, and dropped before the next — then
the layer's output becomes the next layer's input. RAM holds one layer's activations for all
tokens and one expert's weights, never the model's experts. The arithmetic is forward_sequence's on
each window (models/reference.py), operation for operation, so the results are the same numbers.
Dense layers (no experts) are passed through inside the pass; only expert layers are handed out.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator

import numpy as np

from ..models import Expert, MoEModel, read_stored
from ..models.stored_tensor import materialize
from ..models.reference import (attend_sequence, causal_mask, embed_rows, feed_forward, norm, quantize_activation,
                                route_rows, rope_tables, routed_expert_hidden, router_logits, shared_expert)

WINDOW = 256  # tokens per window; each window is a fresh context


@dataclass
class Routed:
    """The rows of one window routed to one expert: their top-k slot and what the expert's down
    projection multiplies (its activation of gate and up, biases included, rounded as its kernel
    reads it)."""

    window: int
    rows: np.ndarray
    slot: np.ndarray
    hidden: np.ndarray


class RoutedLayer:
    """One expert layer of a LayerPass (decoder layer `index`, expert layer `moe_index`) with its
    attention and routing done on every window; the caller applies each expert in order
    (expert_inputs, then add), then the pass moves on."""

    def __init__(self, model: MoEModel, index: int, moe_index: int, entering: list[np.ndarray], rope: dict):
        cfg, layer = model.config, model.layers[index]
        self.model, self.index, self.moe_index, self.layer, self.entering = model, index, moe_index, layer, entering
        self.attended, self.ffn_in, self.logits, self.picks, self.weights = [], [], [], [], []
        for x in entering:
            cos, sin, mask = rope[len(x)]
            a = attend_sequence(model, index, x, cos, sin, mask)
            xn = norm(cfg, a, layer.ffn_norm, layer.ffn_norm_bias)
            logits = router_logits(layer, cfg, xn)
            idx, w = route_rows(cfg, logits, layer.router_bias)
            self.attended.append(a)
            self.ffn_in.append(xn)
            self.logits.append(logits)
            self.picks.append(idx)
            self.weights.append(w)
        # the sum starts from the shared expert, as forward_sequence's (and the runtime's)
        self.out = [shared_expert(layer, cfg, xn, model.trunk_act_group) for xn in self.ffn_in]
        self.applied = 0

    def expert_inputs(self, e: int, expert: Expert) -> list[Routed]:
        """Per window with rows routed to expert e, those rows and their hidden activations."""
        found = []
        for i, idx in enumerate(self.picks):
            rows, slot = np.nonzero(idx == e)
            if len(rows):
                found.append(Routed(i, rows, slot, routed_expert_hidden(self.layer, self.model.config, e,
                                                                        self.ffn_in[i][rows],
                                                                        self.model.expert_act_group, expert)))
        return found

    def add(self, e: int, expert: Expert, routed: list[Routed]) -> None:
        """Adds expert e's weighted output to its rows; experts must come in order (the sums are
        forward_sequence's, in its order)."""
        if e != self.applied:
            raise ValueError(f"layer {self.index}: expert {e} applied after {self.applied - 1}; apply them in order")
        down_bias = self.layer.expert_down_bias[e] if self.model.config.expert_bias else None
        for r in routed:
            y = r.hidden @ expert.w_down.T
            if down_bias is not None:
                y = y + down_bias
            self.out[r.window][r.rows] += self.weights[r.window][r.rows, r.slot][:, None] * y
        self.applied += 1

    def output(self) -> list[np.ndarray]:
        """The residual stream leaving the layer, per window."""
        if self.applied != len(self.layer.experts):
            raise ValueError(f"layer {self.index}: {self.applied} of {len(self.layer.experts)} experts applied")
        return [a + out for a, out in zip(self.attended, self.out)]


class LayerPass:
    """Tokens [T] through `model` in windows of `window` tokens, one layer at a time (module docstring).
    `tokens` may also be a list of texts' tokens, each cut into windows of its own; `piece[i]` says
    which text window i came from. After the last layer, `output` holds the residual stream leaving
    the model, per window. Passes over one model that advance together may share `reads` (a dict):
    each decoder layer's trunk weights are then read once for all of them."""

    def __init__(self, model: MoEModel, tokens: np.ndarray | list[np.ndarray], window: int = WINDOW,
                 reads: dict | None = None):
        cfg = model.config
        texts = [np.asarray(t, dtype=np.int64) for t in (tokens if isinstance(tokens, list) else [tokens])]
        if any(len(t) == 0 or t.min() < 0 or t.max() >= cfg.vocab_size for t in texts):
            raise ValueError(f"calibration token ids must be given and lie in [0, {cfg.vocab_size})")
        self.model = model
        self.windows, self.piece = [], []
        for p, t in enumerate(texts):
            self.windows += [t[i : i + window] for i in range(0, len(t), window)]
            self.piece += [p] * len(range(0, len(t), window))
        self.output: list[np.ndarray] | None = None
        self._reads = {} if reads is None else reads
        self.selected = [np.zeros((len(w), cfg.num_moe_layers, cfg.top_k), np.int32) for w in self.windows]
        self._rope = {}
        for t in {len(w) for w in self.windows}:
            cos, sin = rope_tables(cfg, t)
            self._rope[t] = (cos, sin, causal_mask(t))

    def layers(self) -> Iterator[RoutedLayer]:
        """Each expert layer, routed; once the caller has applied its experts, the next."""
        cfg = self.model.config
        table = materialize(self.model.embed)
        x = [embed_rows(self.model, w, table) for w in self.windows]
        del table
        moe_index = {l: m for m, l in enumerate(cfg.moe_layer_ids)}
        for li in range(cfg.num_layers):
            model = self._with_layer_read(li)
            if li not in moe_index:
                x = [self._dense_layer(model, li, rows) for rows in x]
                continue
            layer = RoutedLayer(model, li, moe_index[li], x, self._rope)
            for sel, idx in zip(self.selected, layer.picks):
                sel[:, layer.moe_index] = idx
            yield layer
            x = layer.output()
        self.output = x

    def _with_layer_read(self, li: int) -> MoEModel:
        """The model with decoder layer li's trunk weights read (a model of stored tensors keeps one
        layer in RAM at a time; its experts stay stored)."""
        if li not in self._reads:
            self._reads.clear()  # the layer before: every pass sharing it has moved on
            layers = list(self.model.layers)
            layers[li] = read_stored(layers[li], lazy_experts=True)
            self._reads[li] = replace(self.model, layers=layers)
        return self._reads[li]

    def _dense_layer(self, model: MoEModel, li: int, x: np.ndarray) -> np.ndarray:
        """One window's residual stream x through dense decoder layer li (attention, then its MLP)."""
        layer = model.layers[li]
        cos, sin, mask = self._rope[len(x)]
        a = attend_sequence(model, li, x, cos, sin, mask)
        return a + feed_forward(model, layer, norm(model.config, a, layer.ffn_norm, layer.ffn_norm_bias), None, None)

    def run_experts(self, layer: RoutedLayer) -> None:
        """Applies every expert of the layer (each read from storage where it is stored)."""
        for e, stored in enumerate(layer.layer.experts):
            expert = read_stored(stored)
            layer.add(e, expert, layer.expert_inputs(e, expert))


def grams(routed: list[Routed], ffn_in: list[np.ndarray], act_group: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    """(XᵀX of the gate/up inputs, of the down inputs, rows) over one expert's routed rows, in
    float64, summed window by window."""
    gate_up = down = None
    n = 0
    for r in routed:
        xa = quantize_activation(ffn_in[r.window][r.rows], act_group).astype(np.float64)
        h = r.hidden.astype(np.float64)
        gate_up = xa.T @ xa if gate_up is None else gate_up + xa.T @ xa
        down = h.T @ h if down is None else down + h.T @ h
        n += len(r.rows)
    return gate_up, down, n
