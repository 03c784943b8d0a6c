"""NumPy reference executor of an encoder-decoder MoE (Switch Transformers): the numerical ground
truth the C runtime's encoder and decoder are checked against.

The encoder runs over the whole input at once (bidirectional attention with T5's relative
position bias, then each layer's dense MLP or top-1 experts, with expert capacity over the input);
its normalised output gives every decoder layer's cross-attention keys and values. The decoder
then runs one token at a time from the decoder start token, with a KV cache, in the order of the
runtime's layer program: self-attention (causal relative bias) → cross-attention → feed-forward.
"""
from __future__ import annotations

import math

import numpy as np

from .config import MoEConfig, MoEModel
from .reference import (attention_output, embed_rows, expert_ffn, final_logits, norm, project_qkv,
                        quantize_activation, route_rows)


def relative_bucket(rel: np.ndarray, bidirectional: bool, num_buckets: int, max_distance: int) -> np.ndarray:
    """T5's bucket of each key-minus-query distance `rel` (integers), computed as transformers does
    (the logarithmic part in float32, truncated)."""
    rel = np.asarray(rel, dtype=np.int64)
    bucket = np.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        bucket += (rel > 0) * num_buckets
        rel = np.abs(rel)
    else:
        rel = -np.minimum(rel, 0)
    exact = num_buckets // 2
    ratio = np.maximum(rel, 1).astype(np.float32) / np.float32(exact)
    large = exact + (np.log(ratio) / np.float32(math.log(max_distance / exact)) *
                     np.float32(num_buckets - exact)).astype(np.int64)
    return bucket + np.where(rel < exact, rel, np.minimum(large, num_buckets - 1))


def position_bias_table(model: MoEModel, encoder: bool, positions: int) -> np.ndarray:
    """The bias a stack adds to its scores, by distance: [2·positions - 1, heads] for the encoder
    (row key - query + positions - 1), [positions, heads] for the decoder (row query - key)."""
    cfg = model.config
    if encoder:
        rel = np.arange(-(positions - 1), positions)
        table = model.encoder_position_bias
    else:
        rel = -np.arange(positions)
        table = model.decoder_position_bias
    return table[relative_bucket(rel, encoder, cfg.relative_buckets, cfg.relative_max_distance)].astype(np.float32)


def feed_forward(model: MoEModel, layer, xn: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """The feed-forward block's output for rows xn (one pass: expert capacity counts these rows)
    and the chosen experts [rows, top_k] (None for a dense layer)."""
    cfg = model.config
    if layer.dense is not None:
        return expert_ffn(layer.dense, xn, model.trunk_act_group), None
    idx, w = route_rows(cfg, xn @ layer.router.T)
    keep = np.ones(idx.shape, bool)
    if cfg.expert_capacity:  # the n-th row choosing an expert is kept while n <= capacity
        for e in range(cfg.num_experts):
            picked = idx == e
            keep &= ~picked | (np.cumsum(picked.reshape(-1)).reshape(idx.shape) <= cfg.expert_capacity)
    out = np.zeros_like(xn)
    for e, ex in enumerate(layer.experts):
        rows, slot = np.nonzero((idx == e) & keep)
        if len(rows):
            out[rows] += w[rows, slot][:, None] * expert_ffn(ex, xn[rows], model.expert_act_group)
    return out, idx


def _attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """Softmax attention of q [Tq, heads, d] over k, v [Tk, heads, d] (+ bias [heads, Tq, Tk]), scores
    divided by sqrt(d) (Switch's q projections carry sqrt(d) from import); returns [Tq, heads·d]."""
    s = np.einsum("thd,uhd->htu", q, k) / np.sqrt(q.shape[-1])
    if bias is not None:
        s = s + bias
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return np.einsum("htu,uhd->thd", p, v).reshape(q.shape[0], -1)


class EncoderDecoderExecutor:
    """The encoder over an input, then the decoder token by token (weights as given: float or
    dequantized)."""

    def __init__(self, model: MoEModel, max_positions: int | None = None):
        cfg = model.config
        if not cfg.encoder_layers:
            raise ValueError(f"{cfg.arch} is not an encoder-decoder model; use ReferenceExecutor")
        self.model = model
        self.max_positions = max_positions or cfg.max_positions
        self.encoder_bias = position_bias_table(model, True, self.max_positions)
        self.decoder_bias = position_bias_table(model, False, self.max_positions)
        self.reset()

    def reset(self) -> None:
        cfg = self.model.config
        n = cfg.num_layers - cfg.encoder_layers
        self.k_cache = np.zeros((n, self.max_positions, cfg.num_kv_heads, cfg.head_dim), np.float32)
        self.v_cache = np.zeros_like(self.k_cache)
        self.cross: list[tuple[np.ndarray, np.ndarray]] = []
        self.pos = 0
        self.trace: list[list[np.ndarray]] = []  # per decoder token: per MoE layer of the decoder, the experts

    def _check(self, tokens) -> None:
        cfg = self.model.config
        if any(not 0 <= t < cfg.vocab_size for t in tokens):
            raise ValueError(f"token ids must lie in [0, {cfg.vocab_size})")

    def encode(self, tokens) -> np.ndarray:
        """Runs the encoder over `tokens`, keeps each decoder layer's cross-attention keys and values,
        and restarts the decoder; returns the encoder's normalised output [T, hidden]."""
        m, cfg = self.model, self.model.config
        self._check(tokens)
        T, S = len(tokens), self.max_positions
        if not 0 < T <= S:
            raise ValueError(f"the encoder input must hold 1 to {S} tokens, not {T}")
        self.reset()
        x = embed_rows(m, np.asarray(tokens), m.encoder_embed)
        rows = np.arange(T)
        bias = self.encoder_bias[rows[None, :] - rows[:, None] + S - 1].transpose(2, 0, 1)  # [heads, Tq, Tk]
        for layer in m.layers[: cfg.encoder_layers]:
            xn = quantize_activation(norm(cfg, x, layer.attn_norm, None), m.trunk_act_group)
            q, k, v = project_qkv(layer, cfg, xn)
            x = x + attention_output(layer, cfg, _attend(q, k, v, bias), m.trunk_act_group)
            x = x + feed_forward(m, layer, norm(cfg, x, layer.ffn_norm, None))[0]
        memory = norm(cfg, x, m.encoder_final_norm, None)
        mq = quantize_activation(memory, m.trunk_act_group)
        for layer in m.layers[cfg.encoder_layers:]:
            shape = (T, cfg.num_kv_heads, cfg.head_dim)
            self.cross.append(((mq @ layer.cwk.T).reshape(shape), (mq @ layer.cwv.T).reshape(shape)))
        return memory

    def step(self, token: int) -> np.ndarray:
        """Feed one decoder token at the next position; return the logits [vocab] (float32)."""
        m, cfg = self.model, self.model.config
        if not self.cross:
            raise ValueError("encode an input before decoding")
        self._check([token])
        if self.pos >= self.max_positions:
            raise ValueError(f"context full: {self.max_positions} positions")
        t = self.pos
        x = embed_rows(m, [token])
        bias = self.decoder_bias[t - np.arange(t + 1)].T[:, None, :]  # [heads, 1, t+1]
        chosen = []
        for i, layer in enumerate(m.layers[cfg.encoder_layers:]):
            xn = quantize_activation(norm(cfg, x, layer.attn_norm, None), m.trunk_act_group)
            q, k, v = project_qkv(layer, cfg, xn)
            self.k_cache[i, t], self.v_cache[i, t] = k[0], v[0]
            att = _attend(q, self.k_cache[i, : t + 1], self.v_cache[i, : t + 1], bias)
            x = x + attention_output(layer, cfg, att, m.trunk_act_group)
            xn = quantize_activation(norm(cfg, x, layer.cross_norm, None), m.trunk_act_group)
            q = (xn @ layer.cwq.T).reshape(1, cfg.num_heads, cfg.head_dim)
            att = quantize_activation(_attend(q, *self.cross[i], None), m.trunk_act_group)
            x = x + att @ layer.cwo.T
            out, idx = feed_forward(m, layer, norm(cfg, x, layer.ffn_norm, None))
            x = x + out
            if idx is not None:
                chosen.append(idx[0])
        self.trace.append(chosen)
        self.pos += 1
        return final_logits(m, x[0])

    def greedy(self, prompt: list[int], n_new: int) -> tuple[list[int], np.ndarray]:
        """Encode `prompt`, then decode greedily from the start token: n_new tokens and the logits
        each was chosen from (the runtime's em_prefill + em_decode_step)."""
        self.encode(prompt)
        logits = self.step(self.model.config.decoder_start_token_id)
        out, all_logits = [], []
        for _ in range(n_new):
            nxt = int(np.argmax(logits))
            out.append(nxt)
            all_logits.append(logits)
            logits = self.step(nxt)
        return out, np.stack(all_logits)

    def decoder_logits(self, prompt: list[int], decoder_tokens: list[int]) -> np.ndarray:
        """The logits after each of `decoder_tokens` (the first usually the start token) given the
        encoder input `prompt` [len(decoder_tokens), vocab]."""
        self.encode(prompt)
        return np.stack([self.step(t) for t in decoder_tokens])
