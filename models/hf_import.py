"""Reading a Hugging Face checkpoint directory (config.json + *.safetensors) strictly: every config
key and every tensor must be understood by the family's importer, or the import fails naming it.
A key nobody reads, or a tensor nobody loads, could change the model's arithmetic (a PhiMoE
checkpoint that calls itself Mixtral has LayerNorm biases and its own routing); it is never
silently ignored."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from .stored_tensor import StoredTensor, read_header


class ModelImportError(ValueError):
    """The checkpoint cannot be imported; the message says what is missing or unsupported."""


# Keys that cannot change what a decoder computes at inference: bookkeeping, training options and
# output switches. A family's importer reads everything else, or the import refuses the key.
INERT_KEYS = {
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "_name_or_path", "use_cache",
    "initializer_range", "output_router_logits", "router_aux_loss_coef", "router_z_loss_coef", "pad_token_id",
    "output_attentions", "output_hidden_states", "return_dict", "problem_type", "id2label", "label2id",
    "chunk_size_feed_forward", "is_encoder_decoder", "router_jitter_noise", "attention_dropout", "hidden_dropout",
    "tokenizer_class", "bos_token_id", "eos_token_id",
}


def read_config(model_dir: Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ModelImportError(f"{path} not found: a model directory needs config.json and *.safetensors "
                               "(or a single .gguf file)")
    return json.loads(path.read_text())


class ConfigReader:
    """config.json's keys, each taken at most once by the importer; `done()` refuses the rest."""

    def __init__(self, hf: dict, where: Path, family: str):
        self.hf, self.where, self.family, self.used = hf, where, family, set(INERT_KEYS)

    def get(self, key: str, default=None):
        self.used.add(key)
        value = self.hf.get(key)
        return default if value is None else value

    def require(self, key: str):
        self.used.add(key)
        if self.hf.get(key) is None:
            raise ModelImportError(f"{self.where}/config.json: {self.family} needs the key {key!r}")
        return self.hf[key]

    def expect(self, key: str, allowed, what: str = "") -> None:
        """The key, if present, must have one of the values `allowed` (a value this importer implements)."""
        self.used.add(key)
        value = self.hf.get(key)
        if key in self.hf and value not in allowed:
            raise ModelImportError(f"{self.where}/config.json: {key} = {value!r} is not supported for {self.family}"
                                   f"{what}; supported: {', '.join(repr(a) for a in allowed)}")

    def rope_theta(self) -> float:
        """θ of plain RoPE, from rope_parameters (transformers 5) or the older rope_theta / rope_scaling."""
        params = self.get("rope_parameters") or {}
        self.expect("rope_scaling", [None])
        kind = params.get("rope_type", "default")
        if kind != "default" or set(params) - {"rope_type", "rope_theta"}:
            raise ModelImportError(f"{self.where}/config.json: rope_parameters {params} is not supported for "
                                   f"{self.family}: only plain RoPE (rope_type 'default')")
        return float(params.get("rope_theta") or self.get("rope_theta", 10000.0))

    def token_id(self, key: str) -> int | None:
        value = self.hf.get(key)
        return value[0] if isinstance(value, list) and value else value

    def done(self) -> None:
        unknown = sorted(set(self.hf) - self.used)
        if unknown:
            raise ModelImportError(f"{self.where}/config.json: key{'s' if len(unknown) > 1 else ''} "
                                   f"{', '.join(map(repr, unknown))} not understood by the {self.family} importer; "
                                   "the checkpoint may be of another family or use an option EdgeMoE does not "
                                   "implement")


class TensorReader:
    """Named tensors of every *.safetensors file of a directory, as StoredTensors (read as float32
    when used: models/stored_tensor.py); `done()` refuses a checkpoint with tensors the importer
    did not ask for."""

    def __init__(self, model_dir: Path):
        files = sorted(Path(model_dir).glob("*.safetensors"))
        if not files:
            raise ModelImportError(f"no *.safetensors file in {model_dir}")
        self.model_dir = Path(model_dir)
        self._where, self._used = {}, set()
        for f in files:
            header, data = read_header(f)
            for name, t in header.items():
                self._where[name] = (f, t, data)

    def has(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str, shape: tuple[int, ...]) -> StoredTensor:
        if name not in self._where:
            raise ModelImportError(f"tensor {name!r} missing from the checkpoint")
        f, t, data = self._where[name]
        if tuple(t["shape"]) != tuple(shape):
            raise ModelImportError(f"tensor {name!r} has shape {tuple(t['shape'])}, config implies {tuple(shape)}")
        self._used.add(name)
        start, end = t["data_offsets"]
        return StoredTensor(f, name, t["dtype"], tuple(shape), data + start, data + end)

    def optional(self, name: str, shape: tuple[int, ...]) -> np.ndarray | None:
        return self.get(name, shape) if name in self._where else None

    def done(self, family: str) -> None:
        unused = sorted(set(self._where) - self._used)
        if unused:
            more = f" and {len(unused) - 5} more" if len(unused) > 5 else ""
            raise ModelImportError(f"{self.model_dir}: tensor{'s' if len(unused) > 1 else ''} "
                                   f"{', '.join(map(repr, unused[:5]))}{more} not used by the {family} importer; "
                                   "the checkpoint may be of another family (their arithmetic would be lost)")


def attention_and_norms(r: TensorReader, cfg, p: str) -> dict:
    """The Llama-style attention block and the two norms of layer prefix `p` (…layers.N.) as Layer fields."""
    H, q, kv = cfg.hidden_size, cfg.q_dim, cfg.kv_dim
    a = p + "self_attn."
    out = dict(attn_norm=r.get(p + "input_layernorm.weight", (H,)),
               ffn_norm=r.get(p + "post_attention_layernorm.weight", (H,)),
               wq=r.get(a + "q_proj.weight", (q, H)), wk=r.get(a + "k_proj.weight", (kv, H)),
               wv=r.get(a + "v_proj.weight", (kv, H)), wo=r.get(a + "o_proj.weight", (H, q)))
    if cfg.qkv_bias:
        out.update(bq=r.get(a + "q_proj.bias", (q,)), bk=r.get(a + "k_proj.bias", (kv,)),
                   bv=r.get(a + "v_proj.bias", (kv,)))
    if cfg.o_bias:
        out["bo"] = r.get(a + "o_proj.bias", (H,))
    if cfg.qk_norm != "none":
        d = cfg.head_dim
        shapes = ((d,), (d,)) if cfg.qk_norm == "head" else ((q,), (kv,))
        out.update(q_norm=r.get(a + "q_norm.weight", shapes[0]), k_norm=r.get(a + "k_norm.weight", shapes[1]))
    return out


def embeddings(r: TensorReader, cfg) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(embed, final norm, LM head) — the LM head is the embedding when tied."""
    H, V = cfg.hidden_size, cfg.vocab_size
    embed = r.get("model.embed_tokens.weight", (V, H))
    lm_head = embed if cfg.tie_embeddings else r.get("lm_head.weight", (V, H))
    return embed, r.get("model.norm.weight", (H,)), lm_head
