"""DeepSeek-V2 and DeepSeek-V3 (DeepSeek-V2-Lite, V2, V2.5, V3, R1): multi-head latent attention,
the first layers dense, shared experts and grouped routing.

How each part maps onto the one architecture description (transformers' modeling_deepseek_v2.py and
modeling_deepseek_v3.py, in eval mode, are the ground truth):

* Attention: multi-head latent attention (``attention="mla"``). q from ``q_proj``, or from
  ``q_b_proj(RMSNorm(q_a_proj x))`` when ``q_lora_rank`` is set; ``kv_a_proj_with_mqa`` gives the
  latent (its first ``kv_lora_rank`` rows, through ``kv_a_layernorm``) and one rotated key of
  ``qk_rope_head_dim`` shared by all heads; ``kv_b_proj`` expands the latent into each head's
  ``qk_nope_head_dim`` key and ``v_head_dim`` value dims. Both bottleneck norms use eps 1e-6 (not
  ``rms_norm_eps``). The KV cache holds the latent and the rotated key.
* RoPE: DeepSeek rotates interleaved pairs (x0, x1), (x2, x3), … (V2 always; V3 when
  ``rope_interleave``). Only q·k of the rotated parts matters, so the importer reorders the rotated
  rows of the q and kv_a projections (evens, then odds) and the rotate-half tables apply. YaRN
  (``rope_type`` "yarn", as the real configs have it) becomes per-frequency ``rope_factors``, its
  attention factor ``rope_scale``, and ``mscale_all_dim`` the softmax scale's mscale².
* ``first_k_dense_replace`` layers are dense SwiGLU MLPs of ``intermediate_size`` (``dense_layers``).
* Shared experts: ``n_shared_experts`` × ``moe_intermediate_size``, ungated.
* Routing: V2 softmax scores, top-k ("greedy") or only within the ``topk_group`` best of ``n_group``
  groups, each scored by its best expert ("group_limited_greedy"), never renormalised; V3 sigmoid
  scores, experts chosen on score + ``e_score_correction_bias`` within the ``topk_group`` best
  groups, each scored by its two best; weighted by the scores, renormalised with ``norm_topk_prob``.
  Both multiply the weights by ``routed_scaling_factor``.
"""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np

from ...config import Layer, MoEConfig, MoEModel
from ...hf_import import ConfigReader, ModelImportError, TensorReader, embeddings, read_config
from ...yarn import yarn_mscale, yarn_rope
from .. import common_config, swiglu_mlp

ARCHITECTURES = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")
FAMILIES = {"DeepseekV2ForCausalLM": "DeepSeek-V2", "DeepseekV3ForCausalLM": "DeepSeek-V3"}
LORA_NORM_EPS = 1e-6  # DeepseekV{2,3}RMSNorm's default, which the q_a and kv_a norms keep


def _rope(c: ConfigReader, dim: int, family: str) -> tuple[dict, float]:
    """The RoPE fields of MoEConfig and the softmax scale's factor: plain RoPE, or YaRN as
    per-frequency divisors of the plain frequencies and a cos/sin scale."""
    params = c.hf.get("rope_parameters") or c.hf.get("rope_scaling") or {}
    source = "rope_parameters" if c.hf.get("rope_parameters") else "rope_scaling"
    c.get("rope_parameters"), c.get("rope_scaling"), c.get("rope_theta")
    if source == "rope_parameters" and c.hf.get("rope_scaling") is not None:
        raise ModelImportError(f"{c.where}/config.json: rope_scaling beside rope_parameters is not supported for "
                               f"{family}")
    kind = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta") or c.get("rope_theta") or 10000.0)
    positions = int(c.require("max_position_embeddings"))
    if kind == "default" and not set(params) - {"rope_type", "type", "rope_theta"}:
        return dict(rope_theta=theta, max_positions=positions), 1.0
    if kind != "yarn":
        raise ModelImportError(f"{c.where}/config.json: {source} rope_type {kind!r} is not supported for {family}; "
                               "supported: 'default', 'yarn'")
    original = params.get("original_max_position_embeddings")
    if not isinstance(original, int) or original <= 0:
        raise ModelImportError(f"{c.where}/config.json: {source} original_max_position_embeddings must be a positive "
                               f"integer for yarn, not {original!r}")
    factor = float(params.get("factor") or positions / original)
    factors, attention_factor = yarn_rope({**params, "rope_theta": theta}, dim, positions, f"{c.where}/config.json")
    mscale_all = params.get("mscale_all_dim")
    softmax = yarn_mscale(factor, mscale_all) ** 2 if mscale_all else 1.0
    return dict(rope_theta=theta, max_positions=positions, rope_factors=factors,
                rope_scale=float(attention_factor)), softmax


def _routing(c: ConfigReader, v3: bool, experts: int, top_k: int) -> dict:
    """The routing fields of MoEConfig (see the module's docstring)."""
    family = c.family
    groups, topk_groups = c.get("n_group") or 1, c.get("topk_group") or 1
    if v3:
        c.expect("topk_method", ["noaux_tc"], " (sigmoid scores with a correction bias)")
        c.expect("scoring_func", ["sigmoid"])
        out = dict(routing="sigmoid", router_bias=True, route_group_score="top2",
                   norm_topk_prob=bool(c.get("norm_topk_prob", True)))
    else:
        method = c.get("topk_method", "greedy")
        c.expect("topk_method", ["greedy", "group_limited_greedy"])
        c.expect("scoring_func", ["softmax"])
        c.expect("norm_topk_prob", [False], " (transformers' DeepSeek-V2 never renormalises the top-k weights)")
        if method == "greedy":
            groups = topk_groups = 1
        out = dict(routing="softmax", route_group_score="max", norm_topk_prob=False)
    if groups < 1 or experts % groups or not 1 <= topk_groups <= groups or top_k > topk_groups * experts // groups \
            or (v3 and groups > 1 and experts // groups < 2):
        raise ModelImportError(f"{c.where}/config.json: n_group = {groups}, topk_group = {topk_groups} do not fit "
                               f"{experts} experts top-{top_k} for {family}: n_group must divide the experts (groups "
                               "of two or more for V3), topk_group lie in [1, n_group] and its groups hold top-k")
    scale = c.get("routed_scaling_factor", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not np.isfinite(np.float32(scale)) \
            or scale <= 0:
        raise ModelImportError(f"{c.where}/config.json: routed_scaling_factor = {scale!r} is not supported for "
                               f"{family}: it must be a finite float32 above 0")
    return dict(out, route_groups=groups, route_topk_groups=topk_groups, route_scale=float(scale))


def describe(hf: dict, where: Path) -> MoEConfig:
    return _describe(hf, where)[0]


def _describe(hf: dict, where: Path) -> tuple[MoEConfig, bool]:
    """The MoEConfig, and whether the checkpoint's rotated dims come in interleaved pairs."""
    arch = next(a for a in hf.get("architectures") or [] if a in FAMILIES)
    family, v3 = FAMILIES[arch], arch == "DeepseekV3ForCausalLM"
    c = ConfigReader(hf, where, family)
    c.expect("attention_bias", [False], " (biases on the q, kv and output projections)")
    c.expect("mlp_bias", [False], " (MLP biases)")
    c.expect("pretraining_tp", [1], " (tensor-parallel slicing of the projections)")
    c.expect("moe_layer_freq", [1], " (MoE layers spaced out)")
    c.get("aux_loss_alpha"), c.get("seq_aux"), c.get("ep_size")  # training and expert-parallel settings
    c.get("auto_map")  # the checkpoint's own modeling code, which this importer replaces
    c.get("num_nextn_predict_layers")  # V3's multi-token prediction modules: not used by plain decoding
    heads = c.require("num_attention_heads")
    c.expect("num_key_value_heads", [heads], " (MLA expands keys and values for every head)")
    rope_dim, nope, v_dim = c.require("qk_rope_head_dim"), c.require("qk_nope_head_dim"), c.require("v_head_dim")
    c.expect("head_dim", [rope_dim], " (it is qk_rope_head_dim in DeepSeek configs)")
    c.expect("qk_head_dim", [nope + rope_dim], " (qk_nope_head_dim + qk_rope_head_dim)")
    interleaved = bool(c.get("rope_interleave", True)) if v3 else True
    rope, softmax_factor = _rope(c, rope_dim, family)
    experts, top_k = c.require("n_routed_experts"), c.require("num_experts_per_tok")
    moe_inter, shared = c.require("moe_intermediate_size"), c.get("n_shared_experts") or 0
    dense = c.get("first_k_dense_replace") or 0
    layers = c.require("num_hidden_layers")
    if not 0 <= dense < layers:
        raise ModelImportError(f"{where}/config.json: first_k_dense_replace = {dense} leaves no MoE layer of "
                               f"{layers} for {family}")
    cfg = common_config(c, arch.removesuffix("ForCausalLM").lower(), experts, moe_inter, rope=rope,
                        shared_expert_intermediate=shared * moe_inter, attention="mla",
                        q_lora_rank=c.get("q_lora_rank") or 0, kv_lora_rank=c.require("kv_lora_rank"),
                        qk_nope_head_dim=nope, v_head_dim=v_dim, lora_norm_eps=LORA_NORM_EPS,
                        attention_scale=softmax_factor / math.sqrt(nope + rope_dim),
                        dense_layers=tuple(range(dense)), dense_intermediate=c.require("intermediate_size") if dense else 0,
                        **_routing(c, v3, experts, top_k))
    if not dense:
        c.get("intermediate_size")  # the size of dense layers, which this model does not have
    c.done()
    return replace(cfg, head_dim=rope_dim, num_kv_heads=heads), interleaved


def _deinterleave(w: np.ndarray, first: int, width: int, stride: int) -> np.ndarray:
    """w with the `width` rows from `first` of every `stride` rows reordered evens then odds: an
    interleaved-pair RoPE's dims in rotate-half order."""
    order = np.arange(len(w))
    for start in range(first, len(w), stride):
        part = order[start : start + width]
        order[start : start + width] = np.concatenate([part[0::2], part[1::2]])
    return np.ascontiguousarray(w[order])


def load(model_dir: Path) -> MoEModel:
    hf = read_config(model_dir)
    cfg, interleaved = _describe(hf, model_dir)
    family = FAMILIES[next(a for a in hf["architectures"] if a in FAMILIES)]
    r = TensorReader(model_dir)
    H, E, I, S = cfg.hidden_size, cfg.num_experts, cfg.expert_intermediate, cfg.shared_expert_intermediate
    R, d, qk, heads = cfg.kv_lora_rank, cfg.head_dim, cfg.qk_head_dim, cfg.num_heads

    def rope_rows(w, first, stride):
        return _deinterleave(w, first, d, stride) if interleaved else w

    def mlp(prefix, inter):
        return swiglu_mlp(r, prefix, inter, H)

    layers = []
    for i in range(cfg.num_layers):
        p, a, m = f"model.layers.{i}.", f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        attn = dict(attn_norm=r.get(p + "input_layernorm.weight", (H,)),
                    ffn_norm=r.get(p + "post_attention_layernorm.weight", (H,)), wk=None, wv=None,
                    wo=r.get(a + "o_proj.weight", (H, heads * cfg.v_head_dim)),
                    wkv_a=rope_rows(r.get(a + "kv_a_proj_with_mqa.weight", (R + d, H)), R, R + d),
                    kv_a_norm=r.get(a + "kv_a_layernorm.weight", (R,)),
                    wkv_b=r.get(a + "kv_b_proj.weight", (heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), R)))
        if cfg.q_lora_rank:
            Q = cfg.q_lora_rank
            attn.update(wq_a=r.get(a + "q_a_proj.weight", (Q, H)), q_a_norm=r.get(a + "q_a_layernorm.weight", (Q,)),
                        wq=r.get(a + "q_b_proj.weight", (heads * qk, Q)))
        else:
            attn["wq"] = r.get(a + "q_proj.weight", (heads * qk, H))
        attn["wq"] = rope_rows(attn["wq"], cfg.qk_nope_head_dim, qk)
        if i in cfg.dense_layers:
            layers.append(Layer(**attn, router=None, dense=mlp(m, cfg.dense_intermediate)))
            continue
        layer = Layer(**attn, router=r.get(m + "gate.weight", (E, H)),
                      experts=[mlp(f"{m}experts.{e}.", I) for e in range(E)],
                      shared=mlp(m + "shared_experts.", S) if S else None)
        if cfg.router_bias:
            layer.router_bias = r.get(m + "gate.e_score_correction_bias", (E,))
        layers.append(layer)
    embed, final_norm, lm_head = embeddings(r, cfg)
    r.done(family)
    return MoEModel(cfg, embed, layers, final_norm, lm_head)
