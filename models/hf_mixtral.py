"""Import a Hugging Face Mixtral checkpoint directory (config.json + *.safetensors)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import safe_open

from .config import Expert, Layer, MoEConfig, MoEModel


class ModelImportError(ValueError):
    """The checkpoint cannot be imported; the message says what is missing or unsupported."""


def read_config(model_dir: Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ModelImportError(f"{path} not found: a model directory needs config.json and *.safetensors")
    return json.loads(path.read_text())


def mixtral_config(hf: dict) -> MoEConfig:
    heads = hf["num_attention_heads"]
    return MoEConfig(
        arch="mixtral",
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        num_experts=hf["num_local_experts"],
        top_k=hf["num_experts_per_tok"],
        expert_intermediate=hf["intermediate_size"],
        max_positions=hf["max_position_embeddings"],
        rope_theta=float(hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 1e6)),
        norm_eps=float(hf["rms_norm_eps"]),
        norm_topk_prob=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
    )


class _TensorReader:
    """Reads named tensors from every *.safetensors file of a directory as float32."""

    def __init__(self, model_dir: Path):
        files = sorted(Path(model_dir).glob("*.safetensors"))
        if not files:
            raise ModelImportError(f"no *.safetensors file in {model_dir}")
        self._where = {}
        for f in files:
            with safe_open(str(f), framework="np") as st:
                for name in st.keys():
                    self._where[name] = f

    def has(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self._where:
            raise ModelImportError(f"tensor {name!r} missing from the checkpoint")
        with safe_open(str(self._where[name]), framework="np") as st:
            t = st.get_tensor(name)
        if tuple(t.shape) != tuple(shape):
            raise ModelImportError(f"tensor {name!r} has shape {tuple(t.shape)}, config implies {tuple(shape)}")
        return np.ascontiguousarray(t, dtype=np.float32)


def load_mixtral(model_dir: Path) -> MoEModel:
    model_dir = Path(model_dir)
    cfg = mixtral_config(read_config(model_dir))
    r = _TensorReader(model_dir)
    H, I, V = cfg.hidden_size, cfg.expert_intermediate, cfg.vocab_size
    layers = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        moe = p + "block_sparse_moe."
        experts = [
            Expert(
                w_gate=r.get(f"{moe}experts.{e}.w1.weight", (I, H)),
                w_up=r.get(f"{moe}experts.{e}.w3.weight", (I, H)),
                w_down=r.get(f"{moe}experts.{e}.w2.weight", (H, I)),
            )
            for e in range(cfg.num_experts)
        ]
        layers.append(
            Layer(
                attn_norm=r.get(p + "input_layernorm.weight", (H,)),
                wq=r.get(p + "self_attn.q_proj.weight", (cfg.q_dim, H)),
                wk=r.get(p + "self_attn.k_proj.weight", (cfg.kv_dim, H)),
                wv=r.get(p + "self_attn.v_proj.weight", (cfg.kv_dim, H)),
                wo=r.get(p + "self_attn.o_proj.weight", (H, cfg.q_dim)),
                ffn_norm=r.get(p + "post_attention_layernorm.weight", (H,)),
                router=r.get(moe + "gate.weight", (cfg.num_experts, H)),
                experts=experts,
            )
        )
    embed = r.get("model.embed_tokens.weight", (V, H))
    if cfg.tie_embeddings or not r.has("lm_head.weight"):
        lm_head = embed
    else:
        lm_head = r.get("lm_head.weight", (V, H))
    return MoEModel(cfg, embed, layers, r.get("model.norm.weight", (H,)), lm_head)
