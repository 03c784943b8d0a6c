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
    # Multi-head latent attention (attention "mla", DeepSeek-V2/V3) in place of q/k/v heads ("mha"):
    # q = wq · x, or wq · RMSNorm(wq_a · x) through a q_lora_rank bottleneck (0: none); the KV cache
    # holds per position a latent RMSNorm(the first kv_lora_rank rows of wkv_a · x) and one RoPE key
    # (the next head_dim rows, rotated) that every head shares; wkv_b expands the latent into each
    # head's qk_nope_head_dim unrotated key and v_head_dim value dims. The bottlenecks' RMSNorms use
    # lora_norm_eps. head_dim is the rotated (RoPE) part of each head's query and key.
    attention: str = "mha"
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0
    lora_norm_eps: float = 1e-6
    attention_scale: float = 0.0  # the softmax's scale of q·k; 0: 1/sqrt(the query-key dims)
    # Layers whose feed-forward block is a dense MLP (resident, trunk bits; its activation expert_activation)
    # in place of experts
    dense_layers: tuple[int, ...] = ()
    dense_intermediate: int = 0
    # Routing beyond the score function ("softmax", "sigmoid" — scores sigmoid(logit), the top-k chosen
    # on score + Layer.router_bias where router_bias — or "sparsemixer"): the experts form route_groups
    # equal groups, each scored by its best score ("max") or its two best summed ("top2") as
    # route_group_score says, and only the route_topk_groups best groups' experts are eligible; the
    # chosen weights (renormalised with norm_topk_prob) are multiplied by route_scale.
    route_groups: int = 1
    route_topk_groups: int = 1
    route_group_score: str = "max"
    route_scale: float = 1.0
    router_bias: bool = False
    # Attention beyond full causal softmax: a learned logit per head joining each softmax's
    # denominator (Layer.sinks), and per layer a sliding window (None: every layer full; else one
    # entry per layer, 0 = full, w = the query attends to its own and the w - 1 positions before it)
    attention_sinks: bool = False
    layer_windows: tuple[int, ...] | None = None
    router_logit_bias: bool = False  # the router adds a bias [num_experts] to its logits (Layer.router_logit_bias)
    # The experts' (and dense MLPs') activation of gate g and up u: "swiglu" silu(g)·u, "clamped_swiglu"
    # (GPT-OSS): g' = min(g, limit), u' = clamp(u, ±limit), (u' + 1)·g'·sigmoid(alpha·g'); or "relu"
    # (two matrices, no gate: down(relu(up x)), Switch Transformers)
    expert_activation: str = "swiglu"
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    expert_bias: bool = False  # the routed experts' gate, up and down projections add biases (Layer.expert_*_bias)
    # Encoder-decoder models (Switch Transformers): the first encoder_layers of the num_layers layers
    # are an encoder, run over the whole input at prefill (bidirectional attention); the rest a
    # decoder run per token, each layer attending to the encoder's output after its self-attention.
    encoder_layers: int = 0
    decoder_start_token_id: int | None = None  # the decoder's first input token
    # Positions: "rope", or "relative" (T5's buckets of the key-query distance, a learned bias per
    # bucket and head added to the scores; bidirectional in the encoder, causal in the decoder)
    position: str = "rope"
    relative_buckets: int = 0
    relative_max_distance: int = 0
    # Tokens one expert takes per pass over a sequence (Switch's expert_capacity; the encoder's pass
    # is the input, the decoder's one token); a token beyond it skips the experts. 0: no limit.
    expert_capacity: int = 0

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def qk_head_dim(self) -> int:
        """The dims of each head's query and key: with MLA, its unrotated and its rotated part."""
        return self.qk_nope_head_dim + self.head_dim if self.attention == "mla" else self.head_dim

    @property
    def attn_out_dim(self) -> int:
        """The width of the attention's output, the output projection's input."""
        return self.num_heads * self.v_head_dim if self.attention == "mla" else self.q_dim

    @property
    def softmax_scale(self) -> float:
        return self.attention_scale or 1.0 / self.qk_head_dim**0.5

    @property
    def moe_layer_ids(self) -> list[int]:
        """The layers with experts, in order (an encoder's before its decoder's): expert layer m is
        layer moe_layer_ids[m]."""
        return [l for l in range(self.num_layers) if l not in self.dense_layers]

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - len(self.dense_layers)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Expert:
    """One SwiGLU expert: down(silu(gate(x)) * up(x)); or, for expert_activation "relu", down(relu(up(x)))
    with w_gate None. Weights are [out, in] float32."""

    w_gate: np.ndarray | None
    w_up: np.ndarray
    w_down: np.ndarray

    def matrices(self) -> list[np.ndarray]:
        """The expert's matrices in record order: gate (if any), up, down."""
        return [w for w in (self.w_gate, self.w_up, self.w_down) if w is not None]


@dataclass
class Layer:
    attn_norm: np.ndarray
    wq: np.ndarray
    wk: np.ndarray
    wv: np.ndarray
    wo: np.ndarray
    ffn_norm: np.ndarray
    router: np.ndarray | None  # [num_experts, hidden]; None in a dense layer
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
    # Multi-head latent attention (MoEConfig.attention "mla"; wq is then q_proj or q_b_proj, wk and wv
    # None): [q_lora_rank, hidden] and [q_lora_rank] with a q bottleneck, [kv_lora_rank + head_dim,
    # hidden], [kv_lora_rank], [heads · (qk_nope_head_dim + v_head_dim), kv_lora_rank]
    wq_a: np.ndarray | None = None
    q_a_norm: np.ndarray | None = None
    wkv_a: np.ndarray | None = None
    kv_a_norm: np.ndarray | None = None
    wkv_b: np.ndarray | None = None
    dense: Expert | None = None  # a dense layer's MLP (dense_intermediate; router None, no experts)
    router_bias: np.ndarray | None = None  # [num_experts], with MoEConfig.router_bias
    sinks: np.ndarray | None = None  # with attention_sinks: [num_heads]
    router_logit_bias: np.ndarray | None = None  # with router_logit_bias: [num_experts]
    expert_gate_bias: np.ndarray | None = None  # with expert_bias: [num_experts, inter], the same, [num_experts, hidden]
    expert_up_bias: np.ndarray | None = None
    expert_down_bias: np.ndarray | None = None
    # A decoder layer of an encoder-decoder: attention over the encoder's output, between the
    # self-attention and the feed-forward block: its norm, q [q_dim, hidden], k and v [kv_dim, hidden]
    # (applied to the encoder's output), output [hidden, q_dim]
    cross_norm: np.ndarray | None = None
    cwq: np.ndarray | None = None
    cwk: np.ndarray | None = None
    cwv: np.ndarray | None = None
    cwo: np.ndarray | None = None

    def trunk_arrays(self) -> list[np.ndarray]:
        """Every resident array of the layer (for parameter counts)."""
        out = [a for a in (self.attn_norm, self.wq, self.wk, self.wv, self.wo, self.ffn_norm, self.router, self.bq,
                           self.bk, self.bv, self.bo, self.q_norm, self.k_norm, self.shared_gate, self.attn_norm_bias,
                           self.ffn_norm_bias, self.wq_a, self.q_a_norm, self.wkv_a, self.kv_a_norm, self.wkv_b,
                           self.router_bias, self.sinks, self.router_logit_bias, self.expert_gate_bias,
                           self.expert_up_bias, self.expert_down_bias, self.cross_norm, self.cwq, self.cwk, self.cwv,
                           self.cwo)
               if a is not None]
        for mlp in (self.shared, self.dense):
            if mlp is not None:
                out += mlp.matrices()
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
    # The element type a runtime keeps its KV cache in (an artifact's "kv_cache"): keys and values are
    # rounded to it as they are stored
    kv_cache: str = "float32"
    final_norm_bias: np.ndarray | None = None  # with norm "layer": [hidden]
    lm_head_bias: np.ndarray | None = None  # with lm_head_bias: [vocab]
    # With position "relative": each stack's bias per bucket and head [relative_buckets, heads]
    # (the first layer of the stack holds it; every layer of the stack adds it)
    decoder_position_bias: np.ndarray | None = None
    encoder_position_bias: np.ndarray | None = None
    encoder_final_norm: np.ndarray | None = None  # with encoder_layers: the norm of the encoder's output
    encoder_embed: np.ndarray | None = None  # the encoder's own embedding [vocab, hidden]; None: it uses embed

    @property
    def moe_layers(self) -> list[Layer]:
        """The layers with experts (expert layer m is moe_layers[m]), dense layers left out."""
        return [self.layers[l] for l in self.config.moe_layer_ids]

    def parameter_counts(self) -> dict:
        experts = sum(w.size for l in self.layers for e in l.experts for w in e.matrices())
        trunk = self.embed.size + self.final_norm.size
        trunk += sum(a.size for a in (self.final_norm_bias, self.lm_head_bias, self.decoder_position_bias,
                                      self.encoder_position_bias, self.encoder_final_norm, self.encoder_embed)
                     if a is not None)
        if not self.config.tie_embeddings:
            trunk += self.lm_head.size
        for l in self.layers:
            trunk += sum(a.size for a in l.trunk_arrays())
        return {"total": experts + trunk, "experts": experts, "trunk": trunk}
