"""One folder per model family: how its config.json maps onto MoEConfig's layer structure (the
family's architecture description) and where its tensors are. Everything downstream — the
reference executor, the kernels, the trunk file, the runtime's layer program — is derived from
the MoEConfig and MoEModel a family produces."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..config import Expert, Layer, MoEConfig, MoEModel
from ..hf_import import ConfigReader, ModelImportError, TensorReader, attention_and_norms, embeddings


def common_config(c: ConfigReader, arch: str, num_experts: int, expert_intermediate: int, rope: dict | None = None,
                  **structure) -> MoEConfig:
    """The MoEConfig fields every Llama-style family reads the same way, plus its own `structure`;
    `rope`: the family's own reading of its RoPE (rope_theta, max_positions and any rope_* field of
    MoEConfig) in place of plain RoPE's."""
    heads = c.require("num_attention_heads")
    hidden = c.require("hidden_size")
    vocab = c.require("vocab_size")
    c.expect("hidden_act", ["silu"])

    def special(key):  # an id outside the vocabulary can never be generated or fed: there is none
        value = c.token_id(key)
        return value if value is not None and 0 <= value < vocab else None

    return MoEConfig(
        arch=arch, vocab_size=vocab, hidden_size=hidden, num_layers=c.require("num_hidden_layers"),
        num_heads=heads, num_kv_heads=c.get("num_key_value_heads", heads), head_dim=c.get("head_dim", hidden // heads),
        num_experts=num_experts, top_k=c.require("num_experts_per_tok"), expert_intermediate=expert_intermediate,
        **(rope or dict(max_positions=c.require("max_position_embeddings"), rope_theta=c.rope_theta())),
        norm_eps=float(c.require("rms_norm_eps")), tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        bos_token_id=special("bos_token_id"), eos_token_id=special("eos_token_id"), **structure)


def swiglu_mlp(r: TensorReader, prefix: str, inter: int, hidden: int) -> Expert:
    """The SwiGLU MLP at `prefix` (…gate_proj/up_proj/down_proj.weight): a dense layer's, a shared
    expert's or a routed expert's."""
    return Expert(r.get(prefix + "gate_proj.weight", (inter, hidden)), r.get(prefix + "up_proj.weight", (inter, hidden)),
                  r.get(prefix + "down_proj.weight", (hidden, inter)))


def load_decoder(model_dir: Path, cfg: MoEConfig, family: str, moe_prefix: str, expert_names: tuple[str, str, str],
                 router: str, shared: tuple[str, str] | None = None) -> MoEModel:
    """A decoder whose layer N keeps its MoE block under `model.layers.N.<moe_prefix>`: experts
    `experts.E.<gate>/<up>/<down>.weight`, the router `<router>.weight`, and with `shared`
    (its MLP's name, its gate's name) a shared expert; a dense layer (cfg.dense_layers) its MLP's
    `gate_proj`/`up_proj`/`down_proj` there instead. Every tensor of the checkpoint must be read."""
    r = TensorReader(model_dir)
    H, I, E = cfg.hidden_size, cfg.expert_intermediate, cfg.num_experts
    gate, up, down = expert_names
    layers = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        m = p + moe_prefix
        if i in cfg.dense_layers:
            layers.append(Layer(**attention_and_norms(r, cfg, p), router=None,
                                dense=swiglu_mlp(r, m, cfg.dense_intermediate, H)))
            continue
        layer = Layer(**attention_and_norms(r, cfg, p), router=r.get(f"{m}{router}.weight", (E, H)),
                      experts=[Expert(r.get(f"{m}experts.{e}.{gate}.weight", (I, H)),
                                      r.get(f"{m}experts.{e}.{up}.weight", (I, H)),
                                      r.get(f"{m}experts.{e}.{down}.weight", (H, I))) for e in range(E)])
        if shared is not None:
            S, (mlp, sg) = cfg.shared_expert_intermediate, shared
            layer.shared = swiglu_mlp(r, f"{m}{mlp}.", S, H)
            if cfg.shared_expert_gate:
                layer.shared_gate = r.get(f"{m}{sg}.weight", (1, H))
        layers.append(layer)
    embed, final_norm, lm_head = embeddings(r, cfg)
    r.done(family)
    return MoEModel(cfg, embed, layers, final_norm, lm_head)


def qwen_dense_layers(c: ConfigReader) -> dict:
    """Qwen-style layer kinds as MoEConfig fields: layer i is dense (an MLP of intermediate_size) when
    listed in mlp_only_layers or when (i + 1) is not a multiple of decoder_sparse_step; only
    full-attention layers (sliding windows refused)."""
    c.expect("use_sliding_window", [False, None], " (sliding-window attention)")
    c.get("sliding_window"), c.get("max_window_layers")  # read only with use_sliding_window
    types = c.get("layer_types") or []
    if any(t != "full_attention" for t in types):
        c.expect("layer_types", [None], " (only full attention)")
    layers, step, only = c.require("num_hidden_layers"), c.get("decoder_sparse_step", 1), c.get("mlp_only_layers") or []
    if isinstance(step, bool) or not isinstance(step, int) or step < 1 or \
            not all(isinstance(i, int) and 0 <= i < layers for i in only):
        raise ModelImportError(f"{c.where}/config.json: decoder_sparse_step = {step!r} / mlp_only_layers = {only!r} "
                               f"is not supported for {c.family}: a step >= 1 and layer indices below {layers}")
    dense = tuple(i for i in range(layers) if i in only or (i + 1) % step)
    if len(dense) == layers:
        raise ModelImportError(f"{c.where}/config.json: decoder_sparse_step and mlp_only_layers leave no MoE layer "
                               f"for {c.family}")
    inter = c.get("intermediate_size")  # the size of dense MLP layers
    if dense and not inter:
        raise ModelImportError(f"{c.where}/config.json: {c.family} needs the key 'intermediate_size' for its dense "
                               "layers")
    return dict(dense_layers=dense, dense_intermediate=inter if dense else 0)


def family_modules() -> list:
    """Every family folder beside this file (a new family is found without being listed anywhere)."""
    import importlib
    import pkgutil

    return [importlib.import_module(f"{__name__}.{m.name}") for m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name)
            if m.ispkg]


__all__ = ["common_config", "swiglu_mlp", "load_decoder", "qwen_dense_layers", "family_modules", "np"]
