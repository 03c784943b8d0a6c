"""Mixtral: softmax over the experts, top-k renormalised; no biases, no q/k norm, no shared expert."""
from __future__ import annotations

from pathlib import Path

from ...gguf_import import GGUFArch
from ...hf_import import ConfigReader, read_config
from .. import common_config, load_decoder

ARCHITECTURES = ("MixtralForCausalLM",)
# llama.cpp stores Mixtral as its "llama" architecture with experts, q/k rows permuted for its RoPE
GGUF = GGUFArch("llama", "mixtral", "Mixtral", norm_topk_prob=True, permuted_qk=True)


def describe(hf: dict, where: Path):
    c = ConfigReader(hf, where, "Mixtral")
    c.expect("sliding_window", [None], " (sliding-window attention)")
    cfg = common_config(c, "mixtral", c.require("num_local_experts"), c.require("intermediate_size"),
                        norm_topk_prob=True)
    c.done()
    return cfg


def load(model_dir: Path):
    cfg = describe(read_config(model_dir), model_dir)
    return load_decoder(model_dir, cfg, "Mixtral", "block_sparse_moe.", ("w1", "w3", "w2"), "gate")
