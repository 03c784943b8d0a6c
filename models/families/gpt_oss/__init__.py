"""GPT-OSS (OpenAI gpt-oss-20b/120b): attention sinks, alternating sliding-window layers, YaRN
RoPE, a router with a bias and softmax over its top-k logits, experts with biases and a clamped
SwiGLU, stored fused (and, in the released checkpoints, as MXFP4).

How each difference maps onto the one architecture description (transformers'
modeling_gpt_oss.py is the ground truth):

* Attention: q/k/v/o biases (``attention_bias``); ``self_attn.sinks`` [heads], a learned logit per
  head that joins every softmax's denominator and carries no value (``attention_sinks``); layer i
  attends to its last ``sliding_window`` positions where ``layer_types[i]`` is
  "sliding_attention", to all of them where "full_attention" (``layer_windows``, 0 = full).
* RoPE: ``rope_parameters`` (or the older ``rope_scaling``) of type "yarn", GPT-OSS's, becomes
  per-frequency divisors and an attention factor on cos and sin (models/yarn.py); plain RoPE as
  the other families; other types refused by name.
* Router: ``mlp.router.weight`` and ``.bias``; the top-k of the logits, a softmax over those k
  (``routing="topk_softmax"``).
* Experts: ``mlp.experts.gate_up_proj`` [E, H, 2I] multiplies x from the right, its columns gate
  and up interleaved (gate the even ones); ``down_proj`` [E, I, H] likewise; their biases
  ``gate_up_proj_bias`` [E, 2I] (interleaved too) and ``down_proj_bias`` [E, H] are resident trunk
  tensors per layer (``expert_bias``). The activation: gate clamped above at ``swiglu_limit``, up
  to ±limit, (up + 1) · gate · sigmoid(``swiglu_alpha`` · gate) (``expert_activation``).
* With ``quantization_config`` {"quant_method": "mxfp4"} the two expert matrices are stored as
  ``*_blocks`` and ``*_scales`` (rows = outputs, mxfp4.py) and decoded exactly to float; the
  compiler then quantizes them like any float expert.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ...config import Expert, Layer, MoEConfig, MoEModel
from ...hf_import import ConfigReader, ModelImportError, TensorReader, attention_and_norms, embeddings, read_config
from ...yarn import yarn_rope
from .. import common_config
from . import mxfp4

ARCHITECTURES = ("GptOssForCausalLM",)
FAMILY = "GPT-OSS"
LAYER_TYPES = {"sliding_attention", "full_attention"}
QUANTIZATION_KEYS = {"quant_method", "modules_to_not_convert"}


def _rope(c: ConfigReader) -> dict | None:
    """None for plain RoPE (common_config reads it); for yarn, MoEConfig's rope fields."""
    source = "rope_parameters" if c.hf.get("rope_parameters") else "rope_scaling"
    params = dict(c.hf.get(source) or {})
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return None
    c.get(source)
    if source == "rope_parameters":
        c.expect("rope_scaling", [None], " beside rope_parameters")
    if kind != "yarn":
        raise ModelImportError(f"{c.where}/config.json: {source} rope_type {kind!r} is not supported for {FAMILY}; "
                               "supported: 'default', 'yarn'")
    params.setdefault("rope_theta", c.get("rope_theta", 150000.0))  # GptOssConfig.default_theta
    heads, positions = c.require("num_attention_heads"), c.require("max_position_embeddings")
    factors, scale = yarn_rope(params, c.get("head_dim", c.require("hidden_size") // heads), positions,
                               f"{c.where}/config.json")
    return dict(max_positions=positions, rope_theta=float(params["rope_theta"]), rope_factors=factors,
                rope_scale=scale)


def _windows(c: ConfigReader, layers: int) -> tuple[int, ...]:
    types = c.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)]
    if len(types) != layers or any(t not in LAYER_TYPES for t in types):
        raise ModelImportError(f"{c.where}/config.json: layer_types = {types!r} is not supported for {FAMILY}: "
                               f"one of {sorted(LAYER_TYPES)} per layer ({layers})")
    window = c.get("sliding_window")
    if "sliding_attention" in types and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ModelImportError(f"{c.where}/config.json: sliding_window = {window!r} is not supported for {FAMILY}: "
                               "sliding_attention layers need a window of at least 1 position")
    return tuple(window if t == "sliding_attention" else 0 for t in types)


def _swiglu(c: ConfigReader, key: str, default: float) -> float:
    value = c.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value <= 0:
        raise ModelImportError(f"{c.where}/config.json: {key} = {value!r} is not supported for {FAMILY}: "
                               "it must be a finite number > 0")
    return float(value)


def _quantization(c: ConfigReader) -> bool:
    """Whether the experts are stored as MXFP4 (quantization_config), which is all this reads."""
    q = c.get("quantization_config")
    if q is None:
        return False
    unknown = sorted(set(q) - QUANTIZATION_KEYS)
    if unknown or q.get("quant_method") != "mxfp4":
        what = f"key {unknown[0]!r} not understood" if unknown else f"quant_method {q.get('quant_method')!r}"
        raise ModelImportError(f"{c.where}/config.json: quantization_config {what} for {FAMILY}; supported: "
                               "quant_method 'mxfp4' (MXFP4 experts) with modules_to_not_convert")
    return True


def _describe(c: ConfigReader) -> tuple[MoEConfig, bool]:
    layers = c.require("num_hidden_layers")
    bias = bool(c.get("attention_bias", True))
    cfg = common_config(c, "gpt_oss", c.require("num_local_experts"), c.require("intermediate_size"), rope=_rope(c),
                        qkv_bias=bias, o_bias=bias, routing="topk_softmax", attention_sinks=True,
                        layer_windows=_windows(c, layers), router_logit_bias=True, expert_activation="clamped_swiglu",
                        swiglu_alpha=_swiglu(c, "swiglu_alpha", 1.702), swiglu_limit=_swiglu(c, "swiglu_limit", 7.0),
                        expert_bias=True)
    packed = _quantization(c)
    c.done()
    return cfg, packed


def describe(hf: dict, where: Path) -> MoEConfig:
    return _describe(ConfigReader(hf, where, FAMILY))[0]


def _expert_matrices(r: TensorReader, m: str, cfg: MoEConfig, packed: bool) -> tuple[np.ndarray, np.ndarray]:
    """gate_up [E, 2I, H] (rows: outputs, gate and up interleaved) and down [E, H, I] of layer prefix `m`."""
    H, I, E = cfg.hidden_size, cfg.expert_intermediate, cfg.num_experts
    if not packed:
        gate_up = r.get(m + "gate_up_proj", (E, H, 2 * I)).transpose(0, 2, 1)
        return gate_up, r.get(m + "down_proj", (E, I, H)).transpose(0, 2, 1)
    out = []
    for name, rows, cols in (("gate_up_proj", 2 * I, H), ("down_proj", H, I)):
        if cols % mxfp4.BLOCK:
            raise ModelImportError(f"MXFP4 tensor {m + name!r}: its {cols} columns are not whole blocks of "
                                   f"{mxfp4.BLOCK}")
        n = cols // mxfp4.BLOCK
        blocks = r.get(f"{m}{name}_blocks", (E, rows, n, mxfp4.BLOCK // 2)).astype(np.uint8)
        scales = r.get(f"{m}{name}_scales", (E, rows, n)).astype(np.uint8)
        out.append(mxfp4.decode(blocks, scales, m + name))
    return out[0], out[1]


def load(model_dir: Path) -> MoEModel:
    cfg, packed = _describe(ConfigReader(read_config(model_dir), model_dir, FAMILY))
    r = TensorReader(model_dir)
    H, I, E = cfg.hidden_size, cfg.expert_intermediate, cfg.num_experts
    layers = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        m = p + "mlp.experts."
        gate_up, down = _expert_matrices(r, m, cfg, packed)
        gate_up_bias = r.get(m + "gate_up_proj_bias", (E, 2 * I))
        experts = [Expert(np.ascontiguousarray(gate_up[e, 0::2]), np.ascontiguousarray(gate_up[e, 1::2]),
                          np.ascontiguousarray(down[e])) for e in range(E)]
        layers.append(Layer(**attention_and_norms(r, cfg, p), router=r.get(p + "mlp.router.weight", (E, H)),
                            experts=experts, sinks=r.get(p + "self_attn.sinks", (cfg.num_heads,)),
                            router_logit_bias=r.get(p + "mlp.router.bias", (E,)),
                            expert_gate_bias=np.ascontiguousarray(gate_up_bias[:, 0::2]),
                            expert_up_bias=np.ascontiguousarray(gate_up_bias[:, 1::2]),
                            expert_down_bias=r.get(m + "down_proj_bias", (E, H))))
    embed, final_norm, lm_head = embeddings(r, cfg)
    r.done(FAMILY)
    return MoEModel(cfg, embed, layers, final_norm, lm_head)
