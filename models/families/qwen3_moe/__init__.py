"""Qwen3-MoE (Qwen3-30B-A3B, 235B-A22B): RMSNorm of each q and k head over head_dim before RoPE,
many experts (128, top-8), no shared expert."""
from __future__ import annotations

from pathlib import Path

from ...gguf_import import GGUFArch
from ...hf_import import ConfigReader, read_config
from .. import common_config, load_decoder, qwen_dense_layers

ARCHITECTURES = ("Qwen3MoeForCausalLM",)
GGUF = GGUFArch("qwen3moe", "qwen3_moe", "Qwen3-MoE", norm_topk_prob=True, qk_norm="head")


def describe(hf: dict, where: Path):
    c = ConfigReader(hf, where, "Qwen3-MoE")
    experts = c.get("num_experts") or c.require("num_local_experts")
    c.get("num_local_experts")
    bias = bool(c.get("attention_bias", False))
    cfg = common_config(c, "qwen3_moe", experts, c.require("moe_intermediate_size"),
                        norm_topk_prob=bool(c.get("norm_topk_prob", False)), qkv_bias=bias, o_bias=bias,
                        qk_norm="head", **qwen_dense_layers(c))
    c.done()
    return cfg


def load(model_dir: Path):
    cfg = describe(read_config(model_dir), model_dir)
    return load_decoder(model_dir, cfg, "Qwen3-MoE", "mlp.", ("gate_proj", "up_proj", "down_proj"), "gate")
