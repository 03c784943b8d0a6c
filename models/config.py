"""The project's own description of an MoE decoder: what every importer produces."""
from __future__ import annotations

from dataclasses import dataclass, field, asdict

import numpy as np


@dataclass(frozen=True)
class MoEConfig:
    """Hyper-parameters of a decoder-only MoE transformer with SwiGLU experts."""

    arch: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    expert_intermediate: int
    max_positions: int
    rope_theta: float
    norm_eps: float
    norm_topk_prob: bool = True  # renormalise the top-k router weights to sum to 1
    tie_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    # The layer's structure beyond Mixtral's, as each family's description (models/families) sets it:
    qkv_bias: bool = False  # the q, k and v projections add a bias
    o_bias: bool = False  # the attention output projection adds a bias
    qk_norm: str = "none"  # RMSNorm of q and k before RoPE: "head" (each head, over head_dim), "full" (whole projection)
    shared_expert_intermediate: int = 0  # a shared SwiGLU expert every token runs (resident, trunk bits); 0 = none
    shared_expert_gate: bool = False  # the shared expert's output scaled by sigmoid(w · x)
    # Scalars a family cannot fold into its weights when the embedding and LM head share one matrix:
    embedding_scale: float = 1.0  # x = embedding_scale · embed[token] (rounded to float32, as the runtime applies it)
    logit_scale: float = 1.0  # logits = logit_scale · (lm_head · norm(x) + lm_head_bias) (float32, likewise)
    # The attention, MoE and final norms: "rms" (RMSNorm, a weight) or "layer" (LayerNorm: mean removed,
    # divided by the standard deviation, then a weight and a bias)
    norm: str = "rms"
    lm_head_bias: bool = False  # the LM head adds a bias [vocab]
    # How the router's logits pick the experts and weigh them: "softmax" (softmax over all experts,
    # the top-k, renormalised with norm_topk_prob), "topk_softmax" (the top-k logits, a softmax over
    # those k) or "sparsemixer" (top-2, each weight a softmax over
    # the experts within a relative margin 2·sparsemixer_eps of that pick: reference.sparsemixer)
    routing: str = "softmax"
    sparsemixer_eps: float = 0.0
    # RoPE beyond plain θ (LongRoPE's short-context form): frequency i divided by rope_factors[i]
    # (head_dim/2 values; None: all 1), and cos and sin multiplied by rope_scale
    rope_factors: tuple[float, ...] | None = None
    rope_scale: float = 1.0
    # Attention beyond full causal softmax: a learned logit per head joining each softmax's
    # denominator (Layer.sinks), and per layer a sliding window (None: every layer full; else one
    # entry per layer, 0 = full, w = the query attends to its own and the w - 1 positions before it)
    attention_sinks: bool = False
    layer_windows: tuple[int, ...] | None = None
    router_bias: bool = False  # the router adds a bias [num_experts] to its logits (Layer.router_bias)
    # The routed experts' activation of gate g and up u: "swiglu" silu(g)·u, or "clamped_swiglu"
    # (GPT-OSS): g' = min(g, limit), u' = clamp(u, ±limit), (u' + 1)·g'·sigmoid(alpha·g')
    expert_activation: str = "swiglu"
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    expert_bias: bool = False  # the routed experts' gate, up and down projections add biases (Layer.expert_*_bias)

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Expert:
    """One SwiGLU expert: down(silu(gate(x)) * up(x)). Weights are [out, in] float32."""

    w_gate: np.ndarray
    w_up: np.ndarray
    w_down: np.ndarray


@dataclass
class Layer:
    attn_norm: np.ndarray
    wq: np.ndarray
    wk: np.ndarray
    wv: np.ndarray
    wo: np.ndarray
    ffn_norm: np.ndarray
    router: np.ndarray  # [num_experts, hidden]
    experts: list[Expert] = field(default_factory=list)
    bq: np.ndarray | None = None  # with qkv_bias: [q_dim], [kv_dim], [kv_dim]
    bk: np.ndarray | None = None
    bv: np.ndarray | None = None
    bo: np.ndarray | None = None  # with o_bias: [hidden]
    q_norm: np.ndarray | None = None  # with qk_norm: [head_dim] ("head") or [q_dim] ("full")
    k_norm: np.ndarray | None = None  # [head_dim] or [kv_dim]
    shared: Expert | None = None  # the shared expert, [shared_expert_intermediate, hidden] matrices
    shared_gate: np.ndarray | None = None  # [1, hidden]
    attn_norm_bias: np.ndarray | None = None  # with norm "layer": [hidden] each
    ffn_norm_bias: np.ndarray | None = None
    sinks: np.ndarray | None = None  # with attention_sinks: [num_heads]
    router_bias: np.ndarray | None = None  # with router_bias: [num_experts]
    expert_gate_bias: np.ndarray | None = None  # with expert_bias: [num_experts, inter], the same, [num_experts, hidden]
    expert_up_bias: np.ndarray | None = None
    expert_down_bias: np.ndarray | None = None

    def trunk_arrays(self) -> list[np.ndarray]:
        """Every resident array of the layer (for parameter counts)."""
        out = [self.attn_norm, self.wq, self.wk, self.wv, self.wo, self.ffn_norm, self.router]
        out += [a for a in (self.bq, self.bk, self.bv, self.bo, self.q_norm, self.k_norm, self.shared_gate,
                            self.attn_norm_bias, self.ffn_norm_bias, self.sinks, self.router_bias,
                            self.expert_gate_bias, self.expert_up_bias, self.expert_down_bias)
                if a is not None]
        if self.shared is not None:
            out += [self.shared.w_gate, self.shared.w_up, self.shared.w_down]
        return out


@dataclass
class MoEModel:
    config: MoEConfig
    embed: np.ndarray  # [vocab, hidden]
    layers: list[Layer]
    final_norm: np.ndarray
    lm_head: np.ndarray  # [vocab, hidden]; the same array as embed when tied
    # Integer-dot kernels quantize each input of a quantized matmul to int8 per group of this many
    # values (None: inputs stay float32); separately for the trunk projections and the experts.
    trunk_act_group: int | None = None
    expert_act_group: int | None = None
    final_norm_bias: np.ndarray | None = None  # with norm "layer": [hidden]
    lm_head_bias: np.ndarray | None = None  # with lm_head_bias: [vocab]

    def parameter_counts(self) -> dict:
        experts = sum(e.w_gate.size + e.w_up.size + e.w_down.size for l in self.layers for e in l.experts)
        trunk = self.embed.size + self.final_norm.size
        trunk += sum(a.size for a in (self.final_norm_bias, self.lm_head_bias) if a is not None)
        if not self.config.tie_embeddings:
            trunk += self.lm_head.size
        for l in self.layers:
            trunk += sum(a.size for a in l.trunk_arrays())
        return {"total": experts + trunk, "experts": experts, "trunk": trunk}
