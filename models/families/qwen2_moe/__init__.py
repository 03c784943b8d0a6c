"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): q/k/v biases, top-k of the softmax without
renormalisation by default, and a shared expert every token runs, scaled by sigmoid(w · x)."""
from __future__ import annotations

from pathlib import Path

from ...gguf_import import GGUFArch
from ...hf_import import ConfigReader, read_config
from .. import common_config, load_decoder, qwen_dense_layers

ARCHITECTURES = ("Qwen2MoeForCausalLM",)
GGUF = GGUFArch("qwen2moe", "qwen2_moe", "Qwen2-MoE", norm_topk_prob=False, qkv_bias=True, shared_expert=True)


def describe(hf: dict, where: Path):
    c = ConfigReader(hf, where, "Qwen2-MoE")
    cfg = common_config(c, "qwen2_moe", c.require("num_experts"), c.require("moe_intermediate_size"),
                        norm_topk_prob=bool(c.get("norm_topk_prob", False)), qkv_bias=bool(c.get("qkv_bias", True)),
                        shared_expert_intermediate=c.require("shared_expert_intermediate_size"),
                        shared_expert_gate=True, **qwen_dense_layers(c))
    c.done()
    return cfg


def load(model_dir: Path):
    cfg = describe(read_config(model_dir), model_dir)
    return load_decoder(model_dir, cfg, "Qwen2-MoE", "mlp.", ("gate_proj", "up_proj", "down_proj"), "gate",
                        shared=("shared_expert", "shared_expert_gate"))
