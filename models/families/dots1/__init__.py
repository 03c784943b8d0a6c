"""dots.llm1 (rednote-hilab): Qwen3-style attention (per-head q/k RMSNorm) over DeepSeek-V3-style
MoE layers, put together from parts the architecture description already has.

How it maps (transformers' modeling_dots1.py is the ground truth):

* Attention: q/k/v/o projections, RMSNorm of each head of q and k before RoPE (``qk_norm="head"``).
  Layers past ``max_window_layers`` would use a sliding window; only full attention is taken
  (the published config windows no layer).
* The first ``first_k_dense_replace`` layers are dense SwiGLU MLPs of ``intermediate_size``.
* Routing: sigmoid scores; the experts chosen on score + ``e_score_correction_bias`` within the
  ``topk_group`` best of ``n_group`` groups, each scored by its two best; weighted by the scores,
  renormalised with ``norm_topk_prob`` and multiplied by ``routed_scaling_factor``.
* Shared experts: one ungated MLP of ``n_shared_experts`` × ``moe_intermediate_size``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ...config import Layer, MoEModel
from ...hf_import import ConfigReader, ModelImportError, TensorReader, attention_and_norms, embeddings, read_config
from .. import common_config, swiglu_mlp

ARCHITECTURES = ("Dots1ForCausalLM",)


def describe(hf: dict, where: Path):
    c = ConfigReader(hf, where, "dots.llm1")
    experts, top_k = c.require("n_routed_experts"), c.require("num_experts_per_tok")
    groups, topk_groups = c.get("n_group") or 1, c.get("topk_group") or 1
    if groups < 1 or experts % groups or experts // groups < 2 and groups > 1 or not 1 <= topk_groups <= groups \
            or top_k > topk_groups * experts // groups:
        raise ModelImportError(f"{where}/config.json: n_group = {groups}, topk_group = {topk_groups} do not fit "
                               f"{experts} experts top-{top_k} for dots.llm1")
    scale = c.get("routed_scaling_factor", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not np.isfinite(np.float32(scale)) \
            or scale <= 0:
        raise ModelImportError(f"{where}/config.json: routed_scaling_factor = {scale!r} is not supported for "
                               "dots.llm1: it must be a finite float32 above 0")
    types = c.get("layer_types") or []
    if any(t != "full_attention" for t in types):
        c.expect("layer_types", [None], " (only full attention)")
    c.get("sliding_window"), c.get("max_window_layers")  # windows only through layer_types, refused above
    c.expect("attention_bias", [False, None])
    layers = c.require("num_hidden_layers")
    dense = int(c.get("first_k_dense_replace") or 0)
    if not 0 <= dense < layers:
        raise ModelImportError(f"{where}/config.json: first_k_dense_replace = {dense} leaves no MoE layer of {layers}")
    moe_inter = c.require("moe_intermediate_size")
    cfg = common_config(c, "dots1", experts, moe_inter, qk_norm="head", routing="sigmoid", router_bias=True,
                        route_group_score="top2", route_groups=groups, route_topk_groups=topk_groups,
                        route_scale=float(scale), norm_topk_prob=bool(c.get("norm_topk_prob", False)),
                        dense_layers=tuple(range(dense)),
                        dense_intermediate=c.require("intermediate_size") if dense else 0,
                        shared_expert_intermediate=moe_inter * int(c.get("n_shared_experts") or 0))
    c.done()
    return cfg


def load(model_dir: Path) -> MoEModel:
    cfg = describe(read_config(model_dir), model_dir)
    r = TensorReader(model_dir)
    H, E, I, S = cfg.hidden_size, cfg.num_experts, cfg.expert_intermediate, cfg.shared_expert_intermediate

    def mlp(prefix, inter):
        return swiglu_mlp(r, prefix, inter, H)

    layers = []
    for i in range(cfg.num_layers):
        p, m = f"model.layers.{i}.", f"model.layers.{i}.mlp."
        if i in cfg.dense_layers:
            layers.append(Layer(**attention_and_norms(r, cfg, p), router=None, dense=mlp(m, cfg.dense_intermediate)))
            continue
        layer = Layer(**attention_and_norms(r, cfg, p), router=r.get(m + "gate.weight", (E, H)),
                      experts=[mlp(f"{m}experts.{e}.", I) for e in range(E)],
                      shared=mlp(m + "shared_experts.", S) if S else None)
        layer.router_bias = r.get(m + "gate.e_score_correction_bias", (E,))
        layers.append(layer)
    embed, final_norm, lm_head = embeddings(r, cfg)
    r.done("dots.llm1")
    return MoEModel(cfg, embed, layers, final_norm, lm_head)
