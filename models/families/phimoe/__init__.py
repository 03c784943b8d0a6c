"""PhiMoE (Microsoft Phi-3.5-MoE): Mixtral's tensor names, with LayerNorm, biases, the
"sparsemixer" router and LongRoPE.

How each difference maps onto the one architecture description (transformers'
modeling_phimoe.py, in eval mode, is the ground truth):

* Norms: the two norms of every layer and the final norm are ``nn.LayerNorm`` with a weight and a
  bias (eps = ``rms_norm_eps``): ``norm="layer"``, the biases ``…layernorm.bias`` and
  ``model.norm.bias``.
* ``attention_bias`` gives the q, k, v and output projections biases (``qkv_bias``, ``o_bias``);
  ``lm_head_bias`` the LM head one (``lm_head.bias``).
* Routing: ``sparsemixer`` at inference (``routing="sparsemixer"``, reference.sparsemixer): always
  two experts, whatever ``num_experts_per_tok`` says (so anything but 2 is refused); each pick's
  weight is a softmax over the experts whose logits lie within a relative margin
  ``2 · router_jitter_noise`` of the pick's (``sparsemixer_eps``), not renormalised. In
  training, Gumbel sampling and ``input_jitter_noise`` make it random; neither acts in eval.
* Experts: ``block_sparse_moe.experts.E.w1/w3/w2`` (gate, up, down) and ``block_sparse_moe.gate``
  (the router), as Mixtral.
* RoPE: plain, or ``longrope`` (Phi-3.5's ``rope_scaling``/``rope_parameters``). transformers
  divides the frequencies by ``short_factor`` and multiplies cos and sin by ``short_mscale`` while
  the sequence fits ``original_max_position_embeddings``; past it, it switches the whole sequence
  (KV cache recomputed) to other scales, which no fixed table reproduces. So the artifact's
  context stops there: ``max_positions`` = min(``max_position_embeddings``,
  ``original_max_position_embeddings``), with ``rope_factors`` = short_factor and ``rope_scale`` =
  short_mscale. Other RoPE types, ``partial_rotary_factor`` or keys of its parameters this does not
  know are refused by name.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ...config import Expert, Layer, MoEModel
from ...hf_import import ConfigReader, ModelImportError, TensorReader, attention_and_norms, embeddings, read_config
from .. import common_config

ARCHITECTURES = ("PhimoeForCausalLM",)
FAMILY = "PhiMoE"

# the keys of a longrope rope_parameters (or older rope_scaling) this importer understands
LONGROPE_KEYS = {"rope_type", "type", "rope_theta", "short_factor", "long_factor", "short_mscale", "long_mscale",
                 "original_max_position_embeddings"}


def _number(where: str, key: str, value, minimum: float = 0.0, above: bool = False) -> float:
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or value < minimum or (above and value == minimum)):
        raise ModelImportError(f"{where}/config.json: {key} = {value!r} is not supported for {FAMILY}: it must be a "
                               f"finite number {'>' if above else '>='} {minimum}")
    return float(value)


def _rope(c: ConfigReader) -> dict | None:
    """None for plain RoPE (common_config reads it); for LongRoPE, its short-context form as MoEConfig fields."""
    params = c.hf.get("rope_parameters") or c.hf.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return None
    source = "rope_parameters" if c.hf.get("rope_parameters") else "rope_scaling"
    c.get(source)
    if source == "rope_parameters":
        c.expect("rope_scaling", [None], " beside rope_parameters")
    if kind != "longrope":
        raise ModelImportError(f"{c.where}/config.json: {source} rope_type {kind!r} is not supported for {FAMILY}; "
                               "supported: 'default', 'longrope'")
    unknown = sorted(set(params) - LONGROPE_KEYS)
    if unknown:
        raise ModelImportError(f"{c.where}/config.json: {source} key{'s' if len(unknown) > 1 else ''} "
                               f"{', '.join(map(repr, unknown))} not understood by the {FAMILY} importer (longrope)")
    heads = c.require("num_attention_heads")
    half = c.get("head_dim", c.require("hidden_size") // heads) // 2
    short = params.get("short_factor")
    if not isinstance(short, list) or len(short) != half:
        raise ModelImportError(f"{c.where}/config.json: {source} short_factor must be a list of head_dim/2 = {half} "
                               f"numbers, not {short!r}")
    factors = tuple(_number(c.where, f"{source} short_factor", f, above=True) for f in short)
    scale = _number(c.where, f"{source} short_mscale", params.get("short_mscale"), above=True)
    original = params.get("original_max_position_embeddings")
    top = c.get("original_max_position_embeddings")
    if top is not None and original is not None and top != original:
        raise ModelImportError(f"{c.where}/config.json: original_max_position_embeddings = {top!r} disagrees with "
                               f"{source}'s {original!r}")
    original = int(_number(c.where, "original_max_position_embeddings", original if original is not None else top,
                           minimum=1))
    theta = _number(c.where, "rope_theta", params.get("rope_theta") or c.get("rope_theta", 10000.0), above=True)
    return dict(rope_theta=theta, rope_factors=factors, rope_scale=scale,
                max_positions=min(int(c.require("max_position_embeddings")), original))


def describe(hf: dict, where: Path):
    c = ConfigReader(hf, where, FAMILY)
    c.expect("sliding_window", [None], " (sliding-window attention)")
    c.expect("num_experts_per_tok", [2], " (sparsemixer routes every token to exactly two experts)")
    eps = _number(where, "router_jitter_noise", c.get("router_jitter_noise", 0.01))
    if not np.isfinite(np.float32(2 * eps)):
        raise ModelImportError(f"{where}/config.json: router_jitter_noise = {eps!r} is not supported for {FAMILY}: "
                               "the runtime compares against 2·router_jitter_noise as a float32, which it overflows")
    c.get("input_jitter_noise")  # multiplies the router's input by noise in training only
    bias = bool(c.get("attention_bias", False))
    cfg = common_config(c, "phimoe", c.require("num_local_experts"), c.require("intermediate_size"), rope=_rope(c),
                        norm="layer", qkv_bias=bias, o_bias=bias, lm_head_bias=bool(c.get("lm_head_bias", False)),
                        routing="sparsemixer", sparsemixer_eps=eps, norm_topk_prob=False)
    c.done()
    return cfg


def load(model_dir: Path) -> MoEModel:
    cfg = describe(read_config(model_dir), model_dir)
    r = TensorReader(model_dir)
    H, I, E, V = cfg.hidden_size, cfg.expert_intermediate, cfg.num_experts, cfg.vocab_size
    layers = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        m = p + "block_sparse_moe."
        layers.append(Layer(**attention_and_norms(r, cfg, p), router=r.get(m + "gate.weight", (E, H)),
                            experts=[Expert(r.get(f"{m}experts.{e}.w1.weight", (I, H)),
                                            r.get(f"{m}experts.{e}.w3.weight", (I, H)),
                                            r.get(f"{m}experts.{e}.w2.weight", (H, I))) for e in range(E)],
                            attn_norm_bias=r.get(p + "input_layernorm.bias", (H,)),
                            ffn_norm_bias=r.get(p + "post_attention_layernorm.bias", (H,))))
    embed, final_norm, lm_head = embeddings(r, cfg)
    model = MoEModel(cfg, embed, layers, final_norm, lm_head, final_norm_bias=r.get("model.norm.bias", (H,)),
                     lm_head_bias=r.get("lm_head.bias", (V,)) if cfg.lm_head_bias else None)
    r.done(FAMILY)
    return model
