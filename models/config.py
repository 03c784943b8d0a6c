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
    # the top-k, renormalised with norm_topk_prob) or "sparsemixer" (top-2, each weight a softmax over
    # the experts within a relative margin 2·sparsemixer_eps of that pick: reference.sparsemixer)
    routing: str = "softmax"
    sparsemixer_eps: float = 0.0
    # RoPE beyond plain θ (LongRoPE's short-context form): frequency i divided by rope_factors[i]
    # (head_dim/2 values; None: all 1), and cos and sin multiplied by rope_scale
    rope_factors: tuple[float, ...] | None = None
    rope_scale: float = 1.0
    # Encoder-decoder models (Switch Transformers): the first encoder_layers of the num_layers layers
    # are an encoder, run over the whole input at prefill (bidirectional attention); the rest a
    # decoder run per token, each layer attending to the encoder's output after its self-attention.
    encoder_layers: int = 0
    decoder_start_token_id: int | None = None  # the decoder's first input token
    # Layers whose feed-forward block is one dense MLP (resident, trunk bits) instead of experts
    dense_layers: tuple[int, ...] = ()
    dense_intermediate: int = 0
    # The experts' (and dense MLPs') activation: "swiglu" (down(silu(gate x) · up x)) or "relu"
    # (two matrices: down(relu(up x)))
    expert_act: str = "swiglu"
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
    def moe_layer_ids(self) -> list[int]:
        """The layers with experts, in order: the expert image's layer m is layer moe_layer_ids[m]."""
        return [i for i in range(self.num_layers) if i not in self.dense_layers]

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - len(self.dense_layers)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Expert:
    """One SwiGLU expert: down(silu(gate(x)) * up(x)); or, for expert_act "relu", down(relu(up(x)))
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
    dense: Expert | None = None  # a dense layer's MLP (dense_intermediate), in place of router and experts
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
        out = [self.attn_norm, self.wq, self.wk, self.wv, self.wo, self.ffn_norm]
        out += [a for a in (self.router, self.bq, self.bk, self.bv, self.bo, self.q_norm, self.k_norm,
                            self.shared_gate, self.attn_norm_bias, self.ffn_norm_bias, self.cross_norm, self.cwq,
                            self.cwk, self.cwv, self.cwo)
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
        """The layers with experts, in order (MoEConfig.moe_layer_ids)."""
        return [self.layers[i] for i in self.config.moe_layer_ids]

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
