"""GraniteMoE (IBM Granite 3.0 MoE, PowerMoE): Mixtral's layer with four scalar multipliers, the
experts' weights fused on disk and the router's top-k taken on the logits.

How each difference maps onto the one architecture description (transformers'
modeling_granitemoe.py is the ground truth):

* Router: top-k of the router logits, then a softmax over those k. The softmax over all experts
  is monotonic in the logits, so it picks the same k, and renormalising its top-k weights gives
  exactly the softmax over the k: ``norm_topk_prob=True`` ("softmax_topk_renorm").
* Experts: ``block_sparse_moe.input_linear.weight`` [E, 2I, H] holds each expert's gate
  projection in its first I rows and its up projection in the next I (transformers splits it
  with ``chunk(2)`` in that order: ``silu(gate) * up``); ``output_linear.weight`` [E, H, I] is the
  down projection; the router is ``block_sparse_moe.router.layer.weight`` [E, H].
* ``attention_multiplier`` replaces 1/sqrt(head_dim) as the attention scale. RoPE is linear in q
  and Granite has no q/k norm, so it is folded into the q projection at import: its rows (and
  its bias) are scaled by attention_multiplier · sqrt(head_dim), and the usual 1/sqrt(head_dim)
  of the runtime's attention gives back attention_multiplier.
* ``residual_multiplier`` scales each block's output before the residual add: folded into the
  attention's output projection (and its bias) and into every expert's down projection (the
  router weights multiply the expert outputs linearly, so the product is unchanged).
* ``embedding_multiplier`` and ``logits_scaling`` act on the embedding and the LM head, which
  Granite checkpoints usually share (``tie_word_embeddings``): folded into the matrix, one would
  also scale the other. They are the config's ``embedding_scale`` and ``logit_scale``
  (= 1 / logits_scaling), which the reference executor and the layer program's EMBED and FINAL
  ops apply, tied or not.

Folding is exact in real arithmetic; in float32 it moves the result by a rounding or so, well
within the reference's 1e-4 agreement with transformers.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ...config import Expert, Layer, MoEModel
from ...hf_import import ConfigReader, ModelImportError, TensorReader, attention_and_norms, embeddings, read_config
from .. import common_config

ARCHITECTURES = ("GraniteMoeForCausalLM",)

MULTIPLIERS = ("embedding_multiplier", "attention_multiplier", "residual_multiplier", "logits_scaling")


def describe(hf: dict, where: Path):
    return _describe(ConfigReader(hf, where, "GraniteMoE"))[0]


def _describe(c: ConfigReader):
    """The MoEConfig and the multipliers (name → float) the import folds into the weights."""
    mult = {}
    for key in MULTIPLIERS:
        value = c.get(key, 1.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ModelImportError(f"{c.where}/config.json: {key} = {value!r} is not supported for GraniteMoE: "
                                   "it must be a finite number")
        mult[key] = float(value)
    if mult["logits_scaling"] == 0:
        raise ModelImportError(f"{c.where}/config.json: logits_scaling = 0 is not supported for GraniteMoE: "
                               "the logits are divided by it")
    for key, value in (("embedding_multiplier", mult["embedding_multiplier"]),
                       ("logits_scaling", 1.0 / mult["logits_scaling"])):
        if not np.isfinite(np.float32(value)):
            raise ModelImportError(f"{c.where}/config.json: {key} = {mult[key]!r} is not supported for GraniteMoE: "
                                   "the runtime applies it as a float32, which it overflows")
    bias = bool(c.get("attention_bias", False))
    cfg = common_config(c, "granitemoe", c.require("num_local_experts"), c.require("intermediate_size"),
                        norm_topk_prob=True, qkv_bias=bias, o_bias=bias,
                        embedding_scale=mult["embedding_multiplier"], logit_scale=1.0 / mult["logits_scaling"])
    if cfg.qk_norm != "none":  # the attention_multiplier fold below assumes q goes unnormalised into RoPE
        raise ModelImportError(f"{c.where}/config.json: GraniteMoE with a q/k norm cannot fold attention_multiplier")
    c.done()
    return cfg, mult


def load(model_dir: Path) -> MoEModel:
    cfg, mult = _describe(ConfigReader(read_config(model_dir), model_dir, "GraniteMoE"))
    return load_granite(model_dir, cfg, mult, "GraniteMoE")


def load_granite(model_dir: Path, cfg, mult: dict, family: str) -> MoEModel:
    """A Granite checkpoint's tensors, the multipliers folded; with cfg.shared_expert_intermediate, each
    layer's ungated shared MLP (``shared_mlp.input_linear`` [2S, H]: gate rows then up rows;
    ``output_linear`` [H, S], scaled by residual_multiplier as the experts' down projections are)."""
    r = TensorReader(model_dir)
    H, I, E = cfg.hidden_size, cfg.expert_intermediate, cfg.num_experts
    q_scale = np.float32(mult["attention_multiplier"] * math.sqrt(cfg.head_dim))
    res = np.float32(mult["residual_multiplier"])
    layers = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        m = p + "block_sparse_moe."
        attn = attention_and_norms(r, cfg, p)
        attn["wq"] = attn["wq"] * q_scale
        attn["wo"] = attn["wo"] * res
        if cfg.qkv_bias:
            attn["bq"] = attn["bq"] * q_scale
        if cfg.o_bias:
            attn["bo"] = attn["bo"] * res
        gate_up = r.get(m + "input_linear.weight", (E, 2 * I, H))
        down = r.get(m + "output_linear.weight", (E, H, I))
        experts = [Expert(np.ascontiguousarray(gate_up[e, :I]), np.ascontiguousarray(gate_up[e, I:]),
                          np.ascontiguousarray(down[e] * res)) for e in range(E)]
        layer = Layer(**attn, router=r.get(m + "router.layer.weight", (E, H)), experts=experts)
        if cfg.shared_expert_intermediate:
            S = cfg.shared_expert_intermediate
            shared_up = r.get(p + "shared_mlp.input_linear.weight", (2 * S, H))
            layer.shared = Expert(np.ascontiguousarray(shared_up[:S]), np.ascontiguousarray(shared_up[S:]),
                                  r.get(p + "shared_mlp.output_linear.weight", (H, S)) * res)
        layers.append(layer)
    embed, final_norm, lm_head = embeddings(r, cfg)
    r.done(family)
    return MoEModel(cfg, embed, layers, final_norm, lm_head)
