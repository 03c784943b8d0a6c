"""NumPy reference executor: the numerical ground truth for every compiled path.

Decodes one token at a time with a KV cache, in float32, in the same order of operations as
the C runtime (embedding × embedding_scale → per layer: norm → attention → residual →
norm → router → the shared expert, then the top-k SwiGLU experts → norm → LM head (+ bias) ×
logit_scale), for every layer structure a MoEConfig describes (biases, q/k norms, shared experts,
RMSNorm or LayerNorm, softmax or sparsemixer routing).
"""
from __future__ import annotations

import numpy as np

from .config import MoEConfig, MoEModel


def rope_tables(cfg: MoEConfig, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin of shape [positions, head_dim/2] (rotate-half convention, as HF Llama/Mixtral); with
    the config's rope_factors each frequency divided by its factor, and both times rope_scale."""
    half = cfg.head_dim // 2
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, half, dtype=np.float64) * 2.0 / cfg.head_dim))
    if cfg.rope_factors is not None:
        inv_freq = inv_freq / np.asarray(cfg.rope_factors, dtype=np.float64)
    ang = np.arange(positions, dtype=np.float64)[:, None] * inv_freq[None, :]
    cos, sin = np.cos(ang), np.sin(ang)
    if cfg.rope_scale != 1:
        cos, sin = cos * cfg.rope_scale, sin * cfg.rope_scale
    return cos.astype(np.float32), sin.astype(np.float32)


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)) * w


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    """LayerNorm over the last axis: (x - mean) / sqrt(variance + eps) · w + b (biased variance, as torch)."""
    xc = x - np.mean(x, axis=-1, keepdims=True)
    return xc / np.sqrt(np.mean(xc * xc, axis=-1, keepdims=True) + eps) * w + b


def norm(cfg: MoEConfig, x: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    """The config's norm of the rows of x with weight w (and, for LayerNorm, bias b)."""
    return layer_norm(x, w, b, cfg.norm_eps) if cfg.norm == "layer" else rms_norm(x, w, cfg.norm_eps)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x: [heads, head_dim]; cos/sin: [head_dim/2]."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def route(router_logits: np.ndarray, top_k: int, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """Softmax over all experts, pick top-k (ties → lower index), optionally renormalise."""
    p = np.exp(router_logits - router_logits.max())
    p /= p.sum()
    idx = np.argsort(-p, kind="stable")[:top_k]
    w = p[idx]
    if normalize:
        w = w / w.sum()
    return idx, w.astype(np.float32)


def sparsemixer(router_logits: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """PhiMoE's sparsemixer routing at inference (transformers' modeling_phimoe.sparsemixer, eval
    mode), in float32: the first pick is the top logit m1 (ties → lower index), weighted by the
    softmax at it over the experts j with (m1 - s_j) / max(|s_j|, m1) <= 2·eps (the others masked);
    the second pick is the top logit m2 of the rest, weighted likewise over the rest, the first pick
    excluded, with m2 in place of m1. The two weights are not renormalised."""
    s = np.asarray(router_logits, dtype=np.float32)
    threshold = np.float32(2 * eps)
    idx, w = [], []
    allowed = np.ones(s.shape, bool)
    for _ in range(2):
        i = int(np.argmax(np.where(allowed, s, -np.inf)))
        m = s[i]
        with np.errstate(divide="ignore", invalid="ignore"):  # 0/0 is NaN: not above the threshold
            keep = allowed & ~((m - s) / np.maximum(np.abs(s), m) > threshold)
        keep[i] = True
        w.append(np.float32(1) / np.exp(s[keep] - m).sum(dtype=np.float32))
        idx.append(i)
        allowed[i] = False
    return np.array(idx), np.array(w, dtype=np.float32)


def route_rows(cfg: MoEConfig, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The chosen experts [T, top_k] and their weights for router logits [T, E], by the config's routing."""
    if cfg.routing == "sparsemixer":
        picks = [sparsemixer(row, cfg.sparsemixer_eps) for row in logits]
        return np.stack([p[0] for p in picks]), np.stack([p[1] for p in picks])
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    idx = np.argsort(-probs, axis=-1, kind="stable")[:, : cfg.top_k]
    w = np.take_along_axis(probs, idx, axis=-1)
    if cfg.norm_topk_prob:
        w = w / w.sum(axis=-1, keepdims=True)
    return idx, w


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def quantize_activation(x: np.ndarray, group: int | None) -> np.ndarray:
    """x (float32 [..., k]) as an integer-dot kernel sees it: int8 codes per group of `group`,
    scale max|x| / 127, rounded half to even (compiler/int_dot.py), dequantized; x itself if group is None."""
    if group is None:
        return x
    g = x.astype(np.float32).reshape(*x.shape[:-1], -1, group)
    amax = np.abs(g).max(axis=-1, keepdims=True)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, np.float32(1)), np.float32(0))
    q = np.rint(g * inv.astype(np.float32))
    return (q * (amax / np.float32(127))).reshape(x.shape).astype(np.float32)


def expert_hidden(ex, xn: np.ndarray, act_group: int | None) -> np.ndarray:
    """silu(gate(x)) * up(x) (relu(up(x)) for an expert without a gate) for rows of xn, rounded as
    the down projection's kernel reads it."""
    xa = quantize_activation(xn, act_group)
    h = np.maximum(xa @ ex.w_up.T, 0) if ex.w_gate is None else silu(xa @ ex.w_gate.T) * (xa @ ex.w_up.T)
    return quantize_activation(h, act_group)


def expert_ffn(ex, xn: np.ndarray, act_group: int | None) -> np.ndarray:
    """down(silu(gate(x)) * up(x)) (down(relu(up(x))) without a gate) for rows of xn."""
    return expert_hidden(ex, xn, act_group) @ ex.w_down.T


def project_qkv(layer, cfg: MoEConfig, xa: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """q [..., heads, d], k and v [..., kv_heads, d] of the (rounded) normalised input rows xa:
    projections, their biases, and the family's q/k norm, before RoPE."""
    q, k, v = xa @ layer.wq.T, xa @ layer.wk.T, xa @ layer.wv.T
    if cfg.qkv_bias:
        q, k, v = q + layer.bq, k + layer.bk, v + layer.bv
    if cfg.qk_norm == "full":
        q, k = rms_norm(q, layer.q_norm, cfg.norm_eps), rms_norm(k, layer.k_norm, cfg.norm_eps)
    lead, d = xa.shape[:-1], cfg.head_dim
    q, k, v = (a.reshape(*lead, -1, d) for a in (q, k, v))
    if cfg.qk_norm == "head":
        q, k = rms_norm(q, layer.q_norm, cfg.norm_eps), rms_norm(k, layer.k_norm, cfg.norm_eps)
    return q, k, v


def attention_output(layer, cfg: MoEConfig, att: np.ndarray, act_group: int | None) -> np.ndarray:
    """The output projection of the attention rows `att` [..., q_dim] (its bias included)."""
    out = quantize_activation(att, act_group) @ layer.wo.T
    return out + layer.bo if cfg.o_bias else out


def shared_expert(layer, cfg: MoEConfig, xn: np.ndarray, act_group: int | None) -> np.ndarray:
    """The shared expert's contribution for rows of xn (zero without one), its sigmoid gate applied."""
    if layer.shared is None:
        return np.zeros_like(xn)
    out = expert_ffn(layer.shared, xn, act_group)
    if cfg.shared_expert_gate:
        out = out / (1.0 + np.exp(-(xn @ layer.shared_gate.T)))
    return out


def embed_rows(model: MoEModel, tokens, table: np.ndarray | None = None) -> np.ndarray:
    """The residual stream entering layer 0: the tokens' embedding rows (of `table`, default the
    model's embedding) times the config's embedding_scale, as float32 (the runtime's EMBED op
    multiplies by the same float32)."""
    x = (model.embed if table is None else table)[tokens].astype(np.float32)
    scale = np.float32(model.config.embedding_scale)
    return x if scale == 1 else (x * scale).astype(np.float32)


def scale_logits(cfg: MoEConfig, logits: np.ndarray) -> np.ndarray:
    """The LM head's output times the config's logit_scale (float32, as the runtime's FINAL op)."""
    scale = np.float32(cfg.logit_scale)
    return logits if scale == 1 else (logits * scale).astype(np.float32)


def final_logits(model: MoEModel, x: np.ndarray) -> np.ndarray:
    """The logits of residual-stream rows x: final norm, LM head (+ its bias), × logit_scale."""
    cfg = model.config
    xn = quantize_activation(norm(cfg, x, model.final_norm, model.final_norm_bias), model.trunk_act_group)
    logits = model.lm_head @ xn if xn.ndim == 1 else xn @ model.lm_head.T
    if cfg.lm_head_bias:
        logits = logits + model.lm_head_bias
    return scale_logits(cfg, logits.astype(np.float32))


def decoder_only(cfg: MoEConfig) -> None:
    """This module's forward passes are a decoder-only model's; an encoder-decoder is refused by name."""
    if cfg.encoder_layers:
        raise ValueError(f"{cfg.arch} is an encoder-decoder model: models/encoder_decoder.py runs it "
                         "(models.reference_executor picks the executor of a model)")


class ReferenceExecutor:
    """Token-by-token decoder over a MoEModel (expert weights as given: float or dequantized)."""

    def __init__(self, model: MoEModel, max_positions: int | None = None):
        self.model = model
        cfg = model.config
        decoder_only(cfg)
        self.max_positions = max_positions or cfg.max_positions
        self.cos, self.sin = rope_tables(cfg, self.max_positions)
        self.reset()

    def reset(self) -> None:
        cfg = self.model.config
        shape = (cfg.num_layers, self.max_positions, cfg.num_kv_heads, cfg.head_dim)
        self.k_cache = np.zeros(shape, np.float32)
        self.v_cache = np.zeros(shape, np.float32)
        self.pos = 0
        self.trace: list[list[np.ndarray]] = []  # per token: per layer, selected expert ids

    def step(self, token: int) -> np.ndarray:
        """Feed one token at the next position; return the logits [vocab] (float32)."""
        m, cfg = self.model, self.model.config
        if not 0 <= token < cfg.vocab_size:
            raise ValueError(f"token id {token} out of range [0, {cfg.vocab_size})")
        if self.pos >= self.max_positions:
            raise ValueError(f"context full: {self.max_positions} positions")
        t = self.pos
        x = embed_rows(m, token)
        group = cfg.num_heads // cfg.num_kv_heads
        chosen = []
        for li, layer in enumerate(m.layers):
            xn = quantize_activation(norm(cfg, x, layer.attn_norm, layer.attn_norm_bias), m.trunk_act_group)
            q, k, v = project_qkv(layer, cfg, xn)
            q = apply_rope(q, self.cos[t], self.sin[t])
            self.k_cache[li, t] = apply_rope(k, self.cos[t], self.sin[t])
            self.v_cache[li, t] = v
            keys = self.k_cache[li, : t + 1]  # [t+1, kv_heads, d]
            vals = self.v_cache[li, : t + 1]
            out = np.empty((cfg.num_heads, cfg.head_dim), np.float32)
            for h in range(cfg.num_heads):
                s = keys[:, h // group, :] @ q[h] / np.sqrt(cfg.head_dim)
                p = np.exp(s - s.max())
                out[h] = (p / p.sum()) @ vals[:, h // group, :]
            x = x + attention_output(layer, cfg, out.reshape(-1), m.trunk_act_group)
            xn = norm(cfg, x, layer.ffn_norm, layer.ffn_norm_bias)
            if cfg.routing == "sparsemixer":
                idx, w = sparsemixer(layer.router @ xn, cfg.sparsemixer_eps)
            else:
                idx, w = route(layer.router @ xn, cfg.top_k, cfg.norm_topk_prob)
            chosen.append(idx)
            x = x + shared_expert(layer, cfg, xn, m.trunk_act_group)  # first, as the runtime: while experts load
            for e, we in zip(idx, w):
                x = x + we * expert_ffn(layer.experts[e], xn, m.expert_act_group)
        self.trace.append(chosen)
        self.pos += 1
        return final_logits(m, x)

    def greedy(self, prompt: list[int], n_new: int) -> tuple[list[int], np.ndarray]:
        """Prefill `prompt`, then greedily generate n_new tokens. Returns (tokens, logits per new token)."""
        logits = None
        for tok in prompt:
            logits = self.step(tok)
        out, all_logits = [], []
        for _ in range(n_new):
            nxt = int(np.argmax(logits))
            out.append(nxt)
            all_logits.append(logits)
            logits = self.step(nxt)
        return out, np.stack(all_logits)


def forward_sequence(model: MoEModel, tokens: np.ndarray, trace: dict | None = None, first_layer: int = 0,
                     hidden: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Whole-sequence causal forward pass (batched, for profiling and perplexity).

    Returns (logits [T, vocab], selected experts [T, layers, top_k]); numerically the same model
    as ReferenceExecutor.step, computed as matrix products over the sequence. With a `trace` dict,
    also records the token embeddings ("embed" [T, H]), each layer's normalised MoE input
    ("ffn_in"), output ("layer_out") and router logits ("router_logits"), [T, ...] per layer.
    With first_layer > 0, starts there from `hidden` (the residual stream entering that layer: the
    "layer_out" of the one before); the earlier layers' selected experts are left zero.
    """
    cfg = model.config
    decoder_only(cfg)
    tokens = np.asarray(tokens, dtype=np.int64)
    if tokens.min() < 0 or tokens.max() >= cfg.vocab_size:
        raise ValueError(f"token ids must lie in [0, {cfg.vocab_size})")
    T, d = len(tokens), cfg.head_dim
    cos, sin = rope_tables(cfg, T)
    group = cfg.num_heads // cfg.num_kv_heads
    mask = np.triu(np.full((T, T), -np.inf, np.float32), k=1)
    x = embed_rows(model, tokens) if first_layer == 0 else hidden
    selected = np.zeros((T, cfg.num_layers, cfg.top_k), np.int32)
    if trace is not None:
        trace.update(embed=x, ffn_in=[], layer_out=[], router_logits=[])
    for li in range(first_layer, cfg.num_layers):
        layer = model.layers[li]
        xn = quantize_activation(norm(cfg, x, layer.attn_norm, layer.attn_norm_bias), model.trunk_act_group)
        q, k, v = project_qkv(layer, cfg, xn)
        q = apply_rope(q, cos[:, None, :], sin[:, None, :])
        k = apply_rope(k, cos[:, None, :], sin[:, None, :])
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
        s = np.einsum("thd,uhd->htu", q, k) / np.sqrt(d) + mask
        p = np.exp(s - s.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        x = x + attention_output(layer, cfg, np.einsum("htu,uhd->thd", p, v).reshape(T, -1), model.trunk_act_group)
        xn = norm(cfg, x, layer.ffn_norm, layer.ffn_norm_bias)
        logits = xn @ layer.router.T
        idx, w = route_rows(cfg, logits)
        selected[:, li] = idx
        out = np.zeros_like(x)
        for e, ex in enumerate(layer.experts):
            rows, slot = np.nonzero(idx == e)
            if len(rows) == 0:
                continue
            out[rows] += w[rows, slot][:, None] * expert_ffn(ex, xn[rows], model.expert_act_group)
        x = x + shared_expert(layer, cfg, xn, model.trunk_act_group) + out
        if trace is not None:
            trace["ffn_in"].append(xn)
            trace["layer_out"].append(x)
            trace["router_logits"].append(logits)
    return final_logits(model, x), selected
