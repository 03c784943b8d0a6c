"""NumPy reference executor: the numerical ground truth for every compiled path.

Decodes one token at a time with a KV cache, in float32, in the same order of operations as
the C runtime (embedding × embedding_scale → per layer: norm → attention → residual →
norm → router → the shared expert, then the top-k experts (or a dense layer's MLP) → norm → LM head
(+ bias) × logit_scale), for every layer structure a MoEConfig describes (biases, q/k norms,
multi-head latent attention, attention sinks, sliding windows, shared experts, dense layers, RMSNorm
or LayerNorm, softmax, sigmoid, top-k-softmax or sparsemixer routing with expert groups, router
biases, SwiGLU or clamped-SwiGLU experts with biases). Latent attention is computed with keys and
values expanded from the cached latents (the runtime folds the expansion instead: an independent
check of the absorbed form).
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


def route_rows(cfg: MoEConfig, logits: np.ndarray, bias: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The chosen experts [T, top_k] and their weights for router logits [T, E], by the config's routing
    (`bias`: the layer's router_bias, added to the scores for choosing only)."""
    if cfg.routing == "sparsemixer":
        picks = [sparsemixer(row, cfg.sparsemixer_eps) for row in logits]
        return np.stack([p[0] for p in picks]), np.stack([p[1] for p in picks])
    if cfg.routing == "topk_softmax":
        idx = np.argsort(-logits, axis=-1, kind="stable")[:, : cfg.top_k]
        top = np.take_along_axis(logits, idx, axis=-1)
        w = np.exp(top - top.max(axis=-1, keepdims=True))
        return idx, (w / w.sum(axis=-1, keepdims=True)).astype(np.float32)
    if cfg.routing == "sigmoid":
        scores = 1.0 / (1.0 + np.exp(-logits))
    else:
        scores = np.exp(logits - logits.max(axis=-1, keepdims=True))
        scores /= scores.sum(axis=-1, keepdims=True)
    choice = scores if bias is None else scores + bias
    if cfg.route_groups > 1:  # only the experts of the route_topk_groups best groups are eligible
        T, E = choice.shape
        grouped = choice.reshape(T, cfg.route_groups, E // cfg.route_groups)
        group_score = grouped.max(axis=-1) if cfg.route_group_score == "max" else \
            np.sort(grouped, axis=-1)[..., -2:].sum(axis=-1)
        best = np.argsort(-group_score, axis=-1, kind="stable")[:, : cfg.route_topk_groups]
        eligible = np.zeros(group_score.shape, bool)
        np.put_along_axis(eligible, best, True, axis=-1)
        choice = np.where(np.repeat(eligible, E // cfg.route_groups, axis=-1), choice, -np.inf)
    idx = np.argsort(-choice, axis=-1, kind="stable")[:, : cfg.top_k]
    w = np.take_along_axis(scores, idx, axis=-1)
    if cfg.norm_topk_prob:
        w = w / w.sum(axis=-1, keepdims=True)
    if cfg.route_scale != 1:
        w = w * np.float32(cfg.route_scale)
    return idx, w.astype(np.float32)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def router_logits(layer, cfg: MoEConfig, xn: np.ndarray) -> np.ndarray:
    """The router's logits for rows of xn (its logit bias added where it has one)."""
    logits = xn @ layer.router.T
    return logits + layer.router_logit_bias if cfg.router_logit_bias else logits


def activate(cfg: MoEConfig | None, g: np.ndarray, u: np.ndarray) -> np.ndarray:
    """The expert activation of gate outputs g and up outputs u: silu(g)·u, or GPT-OSS's clamped
    SwiGLU (MoEConfig.expert_activation) in float32 as its kernels compute it."""
    if cfg is None or cfg.expert_activation == "swiglu":
        return silu(g) * u
    limit, alpha = np.float32(cfg.swiglu_limit), np.float32(cfg.swiglu_alpha)
    g = np.minimum(g, limit)
    u = np.clip(u, -limit, limit)
    return (u + np.float32(1)) * (g / (np.float32(1) + np.exp(-(alpha * g))))


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


def expert_hidden(ex, xn: np.ndarray, act_group: int | None, cfg: MoEConfig | None = None, biases=None) -> np.ndarray:
    """silu(gate(x)) * up(x) (relu(up(x)) for an expert without a gate) for rows of xn, rounded as the
    down projection's kernel reads it; with `cfg`, its expert activation, and with `biases` (gate, up)
    the projections' biases added."""
    xa = quantize_activation(xn, act_group)
    u = xa @ ex.w_up.T
    if ex.w_gate is None:
        return quantize_activation(np.maximum(u, 0), act_group)
    g = xa @ ex.w_gate.T
    if biases is not None:
        g, u = g + biases[0], u + biases[1]
    return quantize_activation(activate(cfg, g, u), act_group)


def expert_ffn(ex, xn: np.ndarray, act_group: int | None) -> np.ndarray:
    """down(silu(gate(x)) * up(x)) (down(relu(up(x))) without a gate) for rows of xn."""
    return expert_hidden(ex, xn, act_group) @ ex.w_down.T


def routed_expert_hidden(layer, cfg: MoEConfig, e: int, xn: np.ndarray, act_group: int | None,
                         expert=None) -> np.ndarray:
    """The input of routed expert e's down projection for rows of xn (its activation and biases);
    `expert`: its weights already read (compiler/layer_pass.py), else layer.experts[e]."""
    biases = (layer.expert_gate_bias[e], layer.expert_up_bias[e]) if cfg.expert_bias else None
    return expert_hidden(layer.experts[e] if expert is None else expert, xn, act_group, cfg, biases)


def routed_expert(layer, cfg: MoEConfig, e: int, xn: np.ndarray, act_group: int | None) -> np.ndarray:
    """Routed expert e of `layer` for rows of xn: down(activation(gate(x), up(x))) (+ its biases)."""
    out = routed_expert_hidden(layer, cfg, e, xn, act_group) @ layer.experts[e].w_down.T
    return out + layer.expert_down_bias[e] if cfg.expert_bias else out


def attention_weights(s: np.ndarray, sink: np.ndarray | None) -> np.ndarray:
    """softmax over the last axis of scores s [..., n]; with a per-head `sink` logit (shaped [..., 1]
    to broadcast against s) joining the denominator, as GPT-OSS's attention sinks (no value)."""
    m = s.max(axis=-1, keepdims=True)
    if sink is not None:
        m = np.maximum(m, sink)
    p = np.exp(s - m)
    z = p.sum(axis=-1, keepdims=True)
    if sink is not None:
        z = z + np.exp(sink - m)
    return p / z


def window_of(cfg: MoEConfig, layer: int) -> int:
    """The layer's sliding window (0: full attention)."""
    return cfg.layer_windows[layer] if cfg.layer_windows is not None else 0


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


def mla_project(layer, cfg: MoEConfig, xa: np.ndarray, act_group: int | None):
    """Multi-head latent attention's inputs from the (rounded) normalised rows xa, before RoPE: the
    queries' unrotated and rotated parts [..., heads, qk_nope_head_dim] and [..., heads, head_dim], the
    latent [..., kv_lora_rank] and the shared key's rotated part [..., head_dim]."""
    if cfg.q_lora_rank:
        qa = rms_norm(xa @ layer.wq_a.T, layer.q_a_norm, cfg.lora_norm_eps)
        q = quantize_activation(qa, act_group) @ layer.wq.T
    else:
        q = xa @ layer.wq.T
    q = q.reshape(*xa.shape[:-1], cfg.num_heads, cfg.qk_head_dim)
    ckv = xa @ layer.wkv_a.T
    r, nope = cfg.kv_lora_rank, cfg.qk_nope_head_dim
    return q[..., :nope], q[..., nope:], rms_norm(ckv[..., :r], layer.kv_a_norm, cfg.lora_norm_eps), ckv[..., r:]


def mla_attend(layer, cfg: MoEConfig, q_nope: np.ndarray, q_rope: np.ndarray, latent: np.ndarray, k_rope: np.ndarray,
               mask: np.ndarray | None = None) -> np.ndarray:
    """Attention output rows [T, heads · v_head_dim] of queries [T, heads, ·] (RoPE applied) over the
    cached latents [U, kv_lora_rank] and rotated keys [U, head_dim], each head's keys and values
    expanded from the latent by wkv_b (the runtime instead folds wkv_b into the query and the output)."""
    nope = cfg.qk_nope_head_dim
    kv = (latent @ layer.wkv_b.T).reshape(len(latent), cfg.num_heads, nope + cfg.v_head_dim)
    s = np.einsum("thd,uhd->htu", q_nope, kv[..., :nope]) + np.einsum("thd,ud->htu", q_rope, k_rope)
    s = s * np.float32(cfg.softmax_scale)
    if mask is not None:
        s = s + mask
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return np.einsum("htu,uhd->thd", p, kv[..., nope:]).reshape(len(q_nope), -1)


def feed_forward(model: MoEModel, layer, xn: np.ndarray, idx: np.ndarray | None, w: np.ndarray | None) -> np.ndarray:
    """The feed-forward block's output for rows xn [T, H]: a dense layer's MLP, or the shared expert
    (first, as the runtime) plus the chosen experts idx [T, top_k] weighted by w."""
    if layer.dense is not None:
        return expert_ffn(layer.dense, xn, model.trunk_act_group)
    out = shared_expert(layer, model.config, xn, model.trunk_act_group)
    for e in range(len(layer.experts)):
        rows, slot = np.nonzero(idx == e)
        if len(rows):
            out[rows] += w[rows, slot][:, None] * routed_expert(layer, model.config, e, xn[rows], model.expert_act_group)
    return out


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


FLOAT16_MAX = 65504.0


def kv_stored(row: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """A key or value row as a KV cache of `dtype` elements stores it: rounded to nearest even, and in
    float16 saturated at ±65504 as the runtime's cache is (kv_cache.c) rather than infinite."""
    if dtype == np.float16:
        row = np.clip(row, -FLOAT16_MAX, FLOAT16_MAX)
    return row.astype(dtype)


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
        dtype = np.dtype(self.model.kv_cache)
        if cfg.attention == "mla":  # the latent and the rotated key per position
            self.k_cache = np.zeros((cfg.num_layers, self.max_positions, cfg.kv_lora_rank), dtype)
            self.v_cache = np.zeros((cfg.num_layers, self.max_positions, cfg.head_dim), dtype)
        else:
            shape = (cfg.num_layers, self.max_positions, cfg.num_kv_heads, cfg.head_dim)
            self.k_cache = np.zeros(shape, dtype)
            self.v_cache = np.zeros(shape, dtype)
        self.pos = 0
        self.trace: list[list[np.ndarray]] = []  # per token: per expert layer, selected expert ids
        self.router_trace: list[list[np.ndarray]] = []  # per token: per expert layer, the router's logits

    def _attention(self, li: int, layer, xn: np.ndarray) -> np.ndarray:
        """Layer li's attention output [heads · v dims] for the normalised input xn at position self.pos,
        its keys and values (or latent and rotated key) written to the cache."""
        m, cfg, t = self.model, self.model.config, self.pos
        cos, sin = self.cos[t], self.sin[t]
        if cfg.attention == "mla":
            q_nope, q_rope, latent, k_rope = mla_project(layer, cfg, xn, m.trunk_act_group)
            self.k_cache[li, t], self.v_cache[li, t] = kv_stored(latent, self.k_cache.dtype), \
                kv_stored(apply_rope(k_rope, cos, sin), self.v_cache.dtype)
            return mla_attend(layer, cfg, q_nope[None], apply_rope(q_rope, cos, sin)[None],
                              self.k_cache[li, : t + 1].astype(np.float32), self.v_cache[li, : t + 1].astype(np.float32))[0]
        group = cfg.num_heads // cfg.num_kv_heads
        q, k, v = project_qkv(layer, cfg, xn)
        q = apply_rope(q, cos, sin)
        self.k_cache[li, t] = kv_stored(apply_rope(k, cos, sin), self.k_cache.dtype)
        self.v_cache[li, t] = kv_stored(v, self.v_cache.dtype)
        window = window_of(cfg, li)
        first = max(0, t + 1 - window) if window else 0
        keys = self.k_cache[li, first : t + 1].astype(np.float32)  # [t+1-first, kv_heads, d]
        vals = self.v_cache[li, first : t + 1].astype(np.float32)
        out = np.empty((cfg.num_heads, cfg.head_dim), np.float32)
        for h in range(cfg.num_heads):
            s = keys[:, h // group, :] @ q[h] / np.sqrt(cfg.head_dim)
            sink = layer.sinks[h : h + 1] if cfg.attention_sinks else None
            out[h] = attention_weights(s, sink) @ vals[:, h // group, :]
        return out.reshape(-1)

    def step(self, token: int) -> np.ndarray:
        """Feed one token at the next position; return the logits [vocab] (float32)."""
        m, cfg = self.model, self.model.config
        if not 0 <= token < cfg.vocab_size:
            raise ValueError(f"token id {token} out of range [0, {cfg.vocab_size})")
        if self.pos >= self.max_positions:
            raise ValueError(f"context full: {self.max_positions} positions")
        x = embed_rows(m, token)
        chosen, scored = [], []
        for li, layer in enumerate(m.layers):
            xn = quantize_activation(norm(cfg, x, layer.attn_norm, layer.attn_norm_bias), m.trunk_act_group)
            x = x + attention_output(layer, cfg, self._attention(li, layer, xn), m.trunk_act_group)
            xn = norm(cfg, x, layer.ffn_norm, layer.ffn_norm_bias)
            if layer.dense is not None:
                x = x + expert_ffn(layer.dense, xn, m.trunk_act_group)
                continue
            logits = router_logits(layer, cfg, xn)
            idx, w = route_rows(cfg, logits[None], layer.router_bias)
            idx, w = idx[0], w[0]
            chosen.append(idx)
            scored.append(logits)
            x = x + shared_expert(layer, cfg, xn, m.trunk_act_group)  # first, as the runtime: while experts load
            for e, we in zip(idx, w):
                x = x + we * routed_expert(layer, cfg, e, xn, m.expert_act_group)
        self.trace.append(chosen)
        self.router_trace.append(scored)
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


def causal_mask(t: int) -> np.ndarray:
    """[t, t]: 0 where a position may attend, -inf after it."""
    return np.triu(np.full((t, t), -np.inf, np.float32), k=1)


def attend_sequence(model: MoEModel, li: int, x: np.ndarray, cos: np.ndarray, sin: np.ndarray,
                    mask: np.ndarray) -> np.ndarray:
    """The residual stream rows x [T, H] (one sequence) after decoder layer li's causal self-attention
    (norm, projections or latent attention, RoPE with the tables of positions 0..T-1, its window and
    sinks, output projection, residual)."""
    cfg, layer = model.config, model.layers[li]
    T, d, group = len(x), cfg.head_dim, cfg.num_heads // cfg.num_kv_heads
    xn = quantize_activation(norm(cfg, x, layer.attn_norm, layer.attn_norm_bias), model.trunk_act_group)
    if cfg.attention == "mla":
        q_nope, q_rope, latent, k_rope = mla_project(layer, cfg, xn, model.trunk_act_group)
        att = mla_attend(layer, cfg, q_nope, apply_rope(q_rope, cos[:, None, :], sin[:, None, :]), latent,
                         apply_rope(k_rope, cos, sin), mask)
    else:
        q, k, v = project_qkv(layer, cfg, xn)
        q = apply_rope(q, cos[:, None, :], sin[:, None, :])
        k = apply_rope(k, cos[:, None, :], sin[:, None, :])
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
        window = window_of(cfg, li)
        # positions more than window - 1 before the query masked too
        masked = mask + np.tril(np.full((T, T), -np.inf, np.float32), k=-window) if window else mask
        s = np.einsum("thd,uhd->htu", q, k) / np.sqrt(d) + masked
        sink = layer.sinks[:, None, None] if cfg.attention_sinks else None  # against s [heads, T, T]
        att = np.einsum("htu,uhd->thd", attention_weights(s, sink), v).reshape(T, -1)
    return x + attention_output(layer, cfg, att, model.trunk_act_group)


def forward_sequence(model: MoEModel, tokens: np.ndarray, trace: dict | None = None, first_layer: int = 0,
                     hidden: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Whole-sequence causal forward pass (batched, for profiling and perplexity).

    Returns (logits [T, vocab], selected experts [T, expert layers, top_k]); numerically the same
    model as ReferenceExecutor.step, computed as matrix products over the sequence. With a `trace`
    dict, also records the token embeddings ("embed" [T, H]) and each decoder layer's output
    ("layer_out"), and each expert layer's normalised MoE input ("ffn_in") and router logits
    ("router_logits"), [T, ...] per layer. With first_layer > 0 (a decoder layer), starts there from
    `hidden` (the residual stream entering that layer: the "layer_out" of the one before); the
    earlier layers' selected experts are left zero.
    """
    cfg = model.config
    decoder_only(cfg)
    tokens = np.asarray(tokens, dtype=np.int64)
    if tokens.min() < 0 or tokens.max() >= cfg.vocab_size:
        raise ValueError(f"token ids must lie in [0, {cfg.vocab_size})")
    cos, sin = rope_tables(cfg, len(tokens))
    mask = causal_mask(len(tokens))
    x = embed_rows(model, tokens) if first_layer == 0 else hidden
    selected = np.zeros((len(tokens), cfg.num_moe_layers, cfg.top_k), np.int32)
    if trace is not None:
        trace.update(embed=x, ffn_in=[], layer_out=[], router_logits=[])
    moe_index = {l: m for m, l in enumerate(cfg.moe_layer_ids)}
    for li in range(first_layer, cfg.num_layers):
        layer = model.layers[li]
        x = attend_sequence(model, li, x, cos, sin, mask)
        xn = norm(cfg, x, layer.ffn_norm, layer.ffn_norm_bias)
        idx = w = None
        if layer.dense is None:
            logits = router_logits(layer, cfg, xn)
            idx, w = route_rows(cfg, logits, layer.router_bias)
            selected[:, moe_index[li]] = idx
            if trace is not None:
                trace["ffn_in"].append(xn)
                trace["router_logits"].append(logits)
        x = x + feed_forward(model, layer, xn, idx, w)
        if trace is not None:
            trace["layer_out"].append(x)
    return final_logits(model, x), selected
