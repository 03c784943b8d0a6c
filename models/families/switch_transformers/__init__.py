"""Switch Transformers (the EdgeMoE paper's own models): a T5 encoder-decoder whose every
encoder_sparse_step-th / decoder_sparse_step-th feed-forward block is a set of ReLU experts with
top-1 routing.

How it maps onto the one architecture description (transformers' modeling_switch_transformers.py
is the ground truth):

* Layers: the encoder's num_layers blocks, then the decoder's num_decoder_layers
  (MoEConfig.encoder_layers). Block i of a stack is sparse when ``i % step == 1`` or step is 1
  (no block when step is 0); the others have a dense ReLU MLP (wi, wo) of d_ff, resident.
* Norms: T5's LayerNorm has no bias and removes no mean: RMSNorm ("rms") with
  layer_norm_epsilon. The encoder's final_layer_norm normalises its output, which every decoder
  layer's cross-attention reads.
* Attention: no 1/sqrt(d_kv) scale on the scores. The runtime's and the reference's attention
  divide by sqrt(head_dim), so the q projections (self and cross) are multiplied by
  sqrt(d_kv) at import: exact for d_kv a power of 4, within a rounding otherwise.
* Positions: relative_attention_bias of the first block of each stack [buckets, heads], added
  to the scores of every block of that stack (position "relative"); the bucket of a distance is
  bidirectional in the encoder, causal in the decoder; cross-attention has none.
* Routing: softmax over the experts in float32 (router_dtype), the top one, its probability
  multiplying the expert's output, not renormalised ("softmax", top_k 1). In eval mode
  transformers applies no jitter (router_jitter_noise acts in training only) but does apply
  expert_capacity: within one forward call, a token whose expert already took expert_capacity
  tokens of that call skips the experts (its feed-forward block adds nothing). The encoder's
  call is the whole input, the cached decoder's one token (MoEConfig.expert_capacity).
* Embeddings: with tie_word_embeddings (Switch checkpoints' setting) one matrix, shared.weight,
  for the encoder, the decoder and the LM head, whose input is then scaled by d_model^-0.5
  (MoEConfig.logit_scale). Without it transformers ties nothing: the encoder reads
  encoder.embed_tokens (MoEModel.encoder_embed), the decoder decoder.embed_tokens, the LM head
  lm_head, unscaled; shared.weight is then read by no forward pass (the importer takes it, as
  the checkpoint's input-embedding handle, without using it).
* The decoder starts from decoder_start_token_id, which Switch checkpoints leave to default to
  pad_token_id.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ...config import Expert, Layer, MoEConfig, MoEModel
from ...hf_import import ConfigReader, ModelImportError, TensorReader, read_config

ARCHITECTURES = ("SwitchTransformersForConditionalGeneration",)
# The relative attention of T5 has no maximum position; the context an artifact gets by default
# (T5's pre-training length).
MAX_POSITIONS = 512


def sparse_blocks(layers: int, step: int) -> list[bool]:
    """Which blocks of a stack have experts (SwitchTransformersStack's rule)."""
    return [step > 0 and (i % step == 1 or step == 1) for i in range(layers)]


def _positive_int(c: ConfigReader, key: str, minimum: int = 1) -> int:
    value = c.require(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ModelImportError(f"{c.where}/config.json: {key} = {value!r} is not supported for Switch Transformers: "
                               f"it must be an integer >= {minimum}")
    return value


def describe(hf: dict, where: Path) -> MoEConfig:
    c = ConfigReader(hf, where, "Switch Transformers")
    c.expect("dense_act_fn", ["relu"], " (the experts' and dense MLPs' activation)")
    c.expect("is_decoder", [False], " (the encoder-decoder)")
    c.expect("add_cross_attention", [False])
    c.expect("router_bias", [False], " (a router without bias)")
    c.expect("router_dtype", ["float32"], " (the router's softmax in float32)")
    c.expect("feed_forward_proj", [None, "relu"])
    # training-only or output options: what an eval forward computes does not depend on them
    for key in ("router_ignore_padding_tokens", "add_router_probs", "initializer_factor", "dropout_rate"):
        c.get(key)
    enc, dec = _positive_int(c, "num_layers"), c.get("num_decoder_layers", c.hf.get("num_layers"))
    if isinstance(dec, bool) or not isinstance(dec, int) or dec < 1:
        raise ModelImportError(f"{where}/config.json: num_decoder_layers = {dec!r} is not supported for Switch "
                               "Transformers: it must be an integer >= 1")
    # transformers derives the steps from num_sparse_*_layers when a config is built; config.json holds both
    c.get("num_sparse_encoder_layers"), c.get("num_sparse_decoder_layers")
    steps = [_positive_int(c, "encoder_sparse_step", 0), _positive_int(c, "decoder_sparse_step", 0)]
    sparse = sparse_blocks(enc, steps[0]) + sparse_blocks(dec, steps[1])
    if not any(sparse):
        raise ModelImportError(f"{where}/config.json: encoder_sparse_step and decoder_sparse_step give no sparse "
                               "block: a model without experts is not an MoE model EdgeMoE compiles")
    d_model, heads, d_kv, vocab = (_positive_int(c, k) for k in ("d_model", "num_heads", "d_kv", "vocab_size"))
    d_ff = _positive_int(c, "d_ff")
    tied = bool(c.get("tie_word_embeddings", True))

    def special(key):
        value = c.token_id(key)
        return value if value is not None and 0 <= value < vocab else None

    start = c.get("decoder_start_token_id")
    start = special("pad_token_id") if start is None else start
    if start is None or not 0 <= start < vocab:
        raise ModelImportError(f"{where}/config.json: the decoder's start token (decoder_start_token_id, else "
                               f"pad_token_id) = {start!r} is not a token of the vocabulary")
    cfg = MoEConfig(
        arch="switch_transformers", vocab_size=vocab, hidden_size=d_model, num_layers=enc + dec, num_heads=heads,
        num_kv_heads=heads, head_dim=d_kv, num_experts=_positive_int(c, "num_experts"), top_k=1,
        expert_intermediate=d_ff, max_positions=MAX_POSITIONS, rope_theta=0.0,
        norm_eps=float(c.require("layer_norm_epsilon")), norm_topk_prob=False, tie_embeddings=tied,
        bos_token_id=special("bos_token_id"), eos_token_id=special("eos_token_id"),
        logit_scale=d_model ** -0.5 if tied else 1.0, encoder_layers=enc, decoder_start_token_id=start,
        dense_layers=tuple(i for i, s in enumerate(sparse) if not s), dense_intermediate=d_ff, expert_activation="relu",
        position="relative", relative_buckets=_positive_int(c, "relative_attention_num_buckets", 2),
        relative_max_distance=_positive_int(c, "relative_attention_max_distance", 2),
        expert_capacity=_positive_int(c, "expert_capacity"))
    c.done()
    return cfg


def _relu_mlp(r: TensorReader, prefix: str, hidden: int, inter: int) -> Expert:
    return Expert(None, r.get(prefix + "wi.weight", (inter, hidden)), r.get(prefix + "wo.weight", (hidden, inter)))


def _attention(r: TensorReader, prefix: str, cfg: MoEConfig) -> list[np.ndarray]:
    """q (times sqrt(d_kv): the scores are not scaled), k, v and o of a T5 attention."""
    H, q = cfg.hidden_size, cfg.q_dim
    scale = np.float32(math.sqrt(cfg.head_dim))
    return [r.get(prefix + "q.weight", (q, H)) * scale, r.get(prefix + "k.weight", (q, H)),
            r.get(prefix + "v.weight", (q, H)), r.get(prefix + "o.weight", (H, q))]


def load(model_dir: Path) -> MoEModel:
    cfg = describe(read_config(model_dir), model_dir)
    r = TensorReader(model_dir)
    H, I, E, enc = cfg.hidden_size, cfg.expert_intermediate, cfg.num_experts, cfg.encoder_layers
    layers = []
    for i in range(cfg.num_layers):
        stack, b = ("encoder", i) if i < enc else ("decoder", i - enc)
        p = f"{stack}.block.{b}.layer."
        wq, wk, wv, wo = _attention(r, p + "0.SelfAttention.", cfg)
        ffn = p + ("1." if stack == "encoder" else "2.")
        layer = Layer(attn_norm=r.get(p + "0.layer_norm.weight", (H,)), wq=wq, wk=wk, wv=wv, wo=wo,
                      ffn_norm=r.get(ffn + "layer_norm.weight", (H,)), router=None)
        if i in cfg.dense_layers:
            layer.dense = _relu_mlp(r, ffn + "mlp.", H, cfg.dense_intermediate)
        else:
            layer.router = r.get(ffn + "mlp.router.classifier.weight", (E, H))
            layer.experts = [_relu_mlp(r, f"{ffn}mlp.experts.expert_{e}.", H, I) for e in range(E)]
        if stack == "decoder":
            layer.cross_norm = r.get(p + "1.layer_norm.weight", (H,))
            layer.cwq, layer.cwk, layer.cwv, layer.cwo = _attention(r, p + "1.EncDecAttention.", cfg)
        layers.append(layer)
    bias_shape, V = (cfg.relative_buckets, cfg.num_heads), cfg.vocab_size
    shared = r.get("shared.weight", (V, H))
    if cfg.tie_embeddings:  # copies of shared.weight, where a checkpoint stores them, must be copies
        for name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"):
            if r.has(name) and not np.array_equal(r.get(name, (V, H)), shared):
                raise ModelImportError(f"{model_dir}: tensor {name!r} differs from shared.weight, which "
                                       "tie_word_embeddings says it is")
        encoder_embed, embed, lm_head = None, shared, shared
    else:
        encoder_embed, embed, lm_head = (r.get(n, (V, H)) for n in ("encoder.embed_tokens.weight",
                                                                    "decoder.embed_tokens.weight", "lm_head.weight"))
    model = MoEModel(
        cfg, embed, layers, r.get("decoder.final_layer_norm.weight", (H,)), lm_head,
        encoder_position_bias=r.get("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                                    bias_shape),
        decoder_position_bias=r.get("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                                    bias_shape),
        encoder_final_norm=r.get("encoder.final_layer_norm.weight", (H,)), encoder_embed=encoder_embed)
    r.done("Switch Transformers")
    return model
