"""OLMoE (OLMoE-1B-7B): RMSNorm over the whole q and k projections before RoPE, 64 experts top-8,
top-k weights not renormalised by default."""
from __future__ import annotations

from pathlib import Path

from ...gguf_import import GGUFArch
from ...hf_import import ConfigReader, read_config
from .. import common_config, load_decoder

ARCHITECTURES = ("OlmoeForCausalLM",)
GGUF = GGUFArch("olmoe", "olmoe", "OLMoE", norm_topk_prob=False, qk_norm="full")


def describe(hf: dict, where: Path):
    c = ConfigReader(hf, where, "OLMoE")
    c.expect("clip_qkv", [None], " (clipping q, k and v)")
    bias = bool(c.get("attention_bias", False))
    cfg = common_config(c, "olmoe", c.require("num_experts"), c.require("intermediate_size"),
                        norm_topk_prob=bool(c.get("norm_topk_prob", False)), qkv_bias=bias, o_bias=bias,
                        qk_norm="full")
    if cfg.head_dim * cfg.num_heads != cfg.hidden_size:
        c.expect("head_dim", [None], " (OLMoE's q norm spans hidden_size: head_dim × heads must equal it)")
    c.done()
    return cfg


def load(model_dir: Path):
    cfg = describe(read_config(model_dir), model_dir)
    return load_decoder(model_dir, cfg, "OLMoE", "mlp.", ("gate_proj", "up_proj", "down_proj"), "gate")
