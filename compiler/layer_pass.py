"""The calibration tokens through a model one layer at a time, for the passes that need every
token's activations at a layer (expert input moments, the routing profile).

All windows advance together: a layer's attention and routing run on every window, then its experts
one after another — each read once for all tokens routed to it, and dropped before the next — then
the layer's output becomes the next layer's input. RAM holds one layer's activations for all
tokens and one expert's weights, never the model's experts. The arithmetic is forward_sequence's on
each window (models/reference.py), operation for operation, so the results are the same numbers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from ..models import Expert, MoEModel, read_stored
from ..models.reference import (attend_sequence, causal_mask, embed_rows, expert_hidden, norm, quantize_activation,
                                route_rows, rope_tables, shared_expert)

WINDOW = 256  # tokens per window; each window is a fresh context


@dataclass
class Routed:
    """The rows of one window routed to one expert: their top-k slot and what the expert's down
    projection multiplies (silu(gate) · up, rounded as its kernel reads it)."""

    window: int
    rows: np.ndarray
    slot: np.ndarray
    hidden: np.ndarray


class RoutedLayer:
    """One layer of a LayerPass with its attention and routing done on every window; the caller
    applies each expert in order (expert_inputs, then add), then the pass moves on."""

    def __init__(self, model: MoEModel, index: int, entering: list[np.ndarray], rope: dict):
        cfg, layer = model.config, model.layers[index]
        self.model, self.index, self.layer, self.entering = model, index, layer, entering
        self.attended, self.ffn_in, self.logits, self.picks, self.weights = [], [], [], [], []
        for x in entering:
            cos, sin, mask = rope[len(x)]
            a = attend_sequence(model, layer, x, cos, sin, mask)
            xn = norm(cfg, a, layer.ffn_norm, layer.ffn_norm_bias)
            logits = xn @ layer.router.T
            idx, w = route_rows(cfg, logits)
            self.attended.append(a)
            self.ffn_in.append(xn)
            self.logits.append(logits)
            self.picks.append(idx)
            self.weights.append(w)
        self.out = [np.zeros_like(a) for a in self.attended]
        self.applied = 0

    def expert_inputs(self, e: int, expert: Expert) -> list[Routed]:
        """Per window with rows routed to expert e, those rows and their hidden activations."""
        found = []
        for i, idx in enumerate(self.picks):
            rows, slot = np.nonzero(idx == e)
            if len(rows):
                found.append(Routed(i, rows, slot,
                                    expert_hidden(expert, self.ffn_in[i][rows], self.model.expert_act_group)))
        return found

    def add(self, e: int, expert: Expert, routed: list[Routed]) -> None:
        """Adds expert e's weighted output to its rows; experts must come in order (the sums are
        forward_sequence's, in its order)."""
        if e != self.applied:
            raise ValueError(f"layer {self.index}: expert {e} applied after {self.applied - 1}; apply them in order")
        for r in routed:
            self.out[r.window][r.rows] += self.weights[r.window][r.rows, r.slot][:, None] * (r.hidden @ expert.w_down.T)
        self.applied += 1

    def output(self) -> list[np.ndarray]:
        """The residual stream leaving the layer, per window."""
        if self.applied != len(self.layer.experts):
            raise ValueError(f"layer {self.index}: {self.applied} of {len(self.layer.experts)} experts applied")
        cfg, group = self.model.config, self.model.trunk_act_group
        return [a + shared_expert(self.layer, cfg, xn, group) + out
                for a, xn, out in zip(self.attended, self.ffn_in, self.out)]


class LayerPass:
    """Tokens [T] through `model` in windows of `window` tokens, one layer at a time (module docstring)."""

    def __init__(self, model: MoEModel, tokens: np.ndarray, window: int = WINDOW):
        cfg = model.config
        tokens = np.asarray(tokens, dtype=np.int64)
        if len(tokens) == 0 or tokens.min() < 0 or tokens.max() >= cfg.vocab_size:
            raise ValueError(f"calibration token ids must be given and lie in [0, {cfg.vocab_size})")
        self.model = model
        self.windows = [tokens[i : i + window] for i in range(0, len(tokens), window)]
        self.selected = [np.zeros((len(w), cfg.num_layers, cfg.top_k), np.int32) for w in self.windows]
        self._rope = {}
        for t in {len(w) for w in self.windows}:
            cos, sin = rope_tables(cfg, t)
            self._rope[t] = (cos, sin, causal_mask(t))

    def layers(self) -> Iterator[RoutedLayer]:
        """Each layer, routed; once the caller has applied its experts, the next."""
        x = [embed_rows(self.model, w) for w in self.windows]
        for li in range(self.model.config.num_layers):
            layer = RoutedLayer(self.model, li, x, self._rope)
            for sel, idx in zip(self.selected, layer.picks):
                sel[:, li] = idx
            yield layer
            x = layer.output()

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
