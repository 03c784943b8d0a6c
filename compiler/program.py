"""The contract between the compiler and the C runtime's layer executor, written once: the ops of
the layer program stored in trunk.bin, their operands in order, the kernel symbols they call and
the names of the tensors the runtime looks up. runtime_c/src/generated/program.h is generated
from this file (python -m edgemoe.compiler.program > runtime_c/src/generated/program.h); a test
keeps the two equal.

A program is uint32 words: per op, its code, its operand count, then the operands (tensor
operands are indices into trunk.bin's tensor table, NONE where absent). The compiler emits the
program of a model from its MoEConfig (emit_program); the runtime checks every operand against
the model's shapes before the first token and walks the ops per token. Which layers a model has,
and what each computes, is the program's business: the runtime's C holds no model family.
"""
from __future__ import annotations

import re
import sys

import numpy as np

NONE = 0xFFFFFFFF

# op name → its operands, in order ("*" marks a matrix: two operands, codes then scales (NONE for
# a float32 matrix))
OPS = {
    "EMBED": ("*embed", "scale"),
    "ATTENTION": ("layer", "norm_kind", "norm", "norm_bias", "*wqkv", "qkv_bias", "qk_norm", "q_norm", "k_norm",
                  "rope_cos", "rope_sin", "*wo", "o_bias"),
    "MOE": ("layer", "norm_kind", "norm", "norm_bias", "router", "route", "route_threshold", "*shared_gate_proj",
            "*shared_up_proj", "*shared_down_proj", "shared_gate", "capacity"),
    "FINAL": ("norm_kind", "norm", "norm_bias", "*lm_head", "lm_head_bias", "scale"),
    # Encoder-decoder models: the steps before ENCODER_OUT are the encoder, which em_prefill runs over
    # the whole input, op by op; ENCODER_OUT normalises its output rows, from which every
    # CROSS_ATTENTION step of the decoder (the steps after it) computes its keys and values.
    "ENCODER_OUT": ("norm_kind", "norm", "norm_bias"),
    # Self-attention with T5's relative position bias in place of RoPE: "position_bias" is a float32
    # table [2·max_positions - 1, heads] by key - query + max_positions - 1 ("bidirectional" 1, the
    # encoder) or [max_positions, heads] by query - key (0, causal); "layer" the KV-cache slot.
    "REL_ATTENTION": ("layer", "norm_kind", "norm", "norm_bias", "*wqkv", "position_bias", "bidirectional", "*wo"),
    # Attention over the encoder's output: q from the decoder, k and v ("wkv", [2·kv_dim, hidden])
    # from the encoder's normalised output; "layer" the cross-attention cache slot.
    "CROSS_ATTENTION": ("layer", "norm_kind", "norm", "norm_bias", "*wq", "*wkv", "*wo"),
    # A dense feed-forward block (resident, trunk bits): "act" an ACT; "gate" NONE for ReLU.
    "DENSE_FFN": ("norm_kind", "norm", "norm_bias", "act", "*gate", "*up", "*down"),
}
# EMBED's and FINAL's "scale": a float32 (its bits as the word) multiplying the embedding row /
# the logits; 1.0 for families without such a factor (MoEConfig.embedding_scale, .logit_scale).
# "norm_kind" (NORM) says which norm "norm" (and, for LayerNorm, "norm_bias") parametrise.
# MOE's "route_threshold": a float32, the sparsemixer's relative margin 2·MoEConfig.sparsemixer_eps
# (0 for the other routing functions). MOE's "layer" counts the layers with experts (the expert
# image's layer); its "capacity" is how many tokens of one pass (the encoder's input, or one
# decoded token) an expert takes before the rest skip the experts (MoEConfig.expert_capacity; 0: no limit).
OP_CODES = {name: i + 1 for i, name in enumerate(OPS)}

NORM = {"rms": 0, "layer": 1}  # the norm_kind operands: MoEConfig.norm
QK_NORM = {"none": 0, "head": 1, "full": 2}  # ATTENTION's qk_norm operand
ROUTE = {"softmax_topk": 0, "softmax_topk_renorm": 1, "sparsemixer": 2}  # MOE's route operand
# The activation of an expert or dense MLP (MoEConfig.expert_act): DENSE_FFN's act operand and the
# expert image header's (which records, of three matrices or two, it holds)
ACT = {"swiglu": 0, "relu": 1}

# kernel role → symbol: the names decode_kernels gives its PrimFuncs and the runtime resolves
KERNELS = {
    "rmsnorm": "em_rmsnorm", "layernorm": "em_layernorm", "qkv": "em_qkv", "qkv_bias": "em_qkv_bias",
    "qk_norm": "em_qk_norm", "rope": "em_rope", "attention": "em_attention", "add": "em_add", "o_proj": "em_o_proj",
    "router": "em_router", "shared_gate": "em_shared_gate", "shared_gate_up": "em_shared_gate_up",
    "shared_down": "em_shared_down", "lm_head": "em_lm_head", "lm_head_bias": "em_lm_head_bias",
    "attention_bias": "em_attention_bias", "cross_q": "em_cross_q", "cross_kv": "em_cross_kv",
    "dense_up_relu": "em_dense_up_relu", "dense_down": "em_dense_down",
}
EXPERT_KERNELS = {"expert_gate_up": "em_expert_gate_up_w{bits}", "expert_down": "em_expert_down_w{bits}",
                  "expert_up_relu": "em_expert_up_relu_w{bits}"}

# Kernel signatures: each kernel's parameters in order, by name ("*" marks a matrix: one parameter for
# float32/float16 weights, two — codes, then float16 scales — for quantized ones). The TVM builders
# name their parameters so (kernels.check_signature refuses a PrimFunc that differs) and the runtime
# places each argument at its generated index (EM_SIG_<SIGNATURE>_<PARAM>), so the order is written here only.
SIGNATURES = {
    "norm": ("x", "w", "y"),
    "norm_bias": ("x", "w", "b", "y"),
    "matvec": ("*w", "x", "y"),
    "matvec_residual": ("*w", "x", "res", "y"),
    "qk_norm": ("qkv", "qw", "kw", "y"),
    "rope": ("qkv", "cos", "sin", "q", "k", "v"),
    "attention": ("q", "kc", "vc", "o"),
    "add": ("a", "b", "y"),
    "ffn_gate_up": ("x", "*gate", "*up", "h"),
    "ffn_down": ("h", "*down", "res", "weight", "y"),
    "attention_bias": ("q", "kc", "vc", "bias", "o"),
    "ffn_up": ("x", "*up", "h"),
}
# kernel role (KERNELS, EXPERT_KERNELS) → its signature
KERNEL_SIGNATURES = {
    "rmsnorm": "norm", "layernorm": "norm_bias", "qkv": "matvec", "qkv_bias": "matvec_residual",
    "qk_norm": "qk_norm", "rope": "rope", "attention": "attention", "add": "add", "o_proj": "matvec_residual",
    "router": "matvec", "shared_gate": "matvec", "shared_gate_up": "ffn_gate_up", "shared_down": "ffn_down",
    "lm_head": "matvec", "lm_head_bias": "matvec_residual", "expert_gate_up": "ffn_gate_up",
    "expert_down": "ffn_down", "attention_bias": "attention_bias", "cross_q": "matvec", "cross_kv": "matvec",
    "dense_up_relu": "ffn_up", "dense_down": "ffn_down", "expert_up_relu": "ffn_up",
}

# tensors the runtime finds by name (the routing profile, when compiled with calibration text)
PROFILE_TENSORS = {
    "path_table": "profile.path_table", "frequency": "profile.frequency", "fitted_router": "profile.fitted_router",
    "fitted_router_prev": "profile.fitted_router_prev", "fitted_router_bias": "profile.fitted_router_bias",
}


def kernel_role(symbol: str) -> str:
    """The role (a KERNELS or EXPERT_KERNELS key) of a kernel symbol."""
    for role, name in KERNELS.items():
        if name == symbol:
            return role
    for role, pattern in EXPERT_KERNELS.items():
        if re.fullmatch(re.escape(pattern).replace(re.escape("{bits}"), "[0-9]+"), symbol):
            return role
    raise KeyError(f"no kernel role has the symbol {symbol!r}")


def operand_slots(op: str) -> list[str]:
    """The op's operand words in order (a matrix takes two: NAME and NAME.scales)."""
    out = []
    for o in OPS[op]:
        out += [o[1:], o[1:] + ".scales"] if o.startswith("*") else [o]
    return out


def float_word(value: float) -> int:
    """A float operand as its program word: the bits of the float32 nearest `value`, which must be finite."""
    f = np.float32(value)
    if not np.isfinite(f):
        raise ValueError(f"program operand {value!r} is not a finite float32")
    return int(f.view(np.uint32))


def routing(cfg) -> str:
    """The MOE op's routing function (a ROUTE key) for a MoEConfig."""
    if cfg.routing == "sparsemixer":
        if cfg.top_k != 2:
            raise ValueError(f"sparsemixer routing picks two experts, not top_k = {cfg.top_k}")
        return "sparsemixer"
    if cfg.routing != "softmax":
        raise ValueError(f"unknown routing {cfg.routing!r}; supported: softmax, sparsemixer")
    return "softmax_topk_renorm" if cfg.norm_topk_prob else "softmax_topk"


def emit_program(cfg, index) -> np.ndarray:
    """The layer program of a model: `index(name)` gives a trunk tensor's table index (NONE if the
    trunk has no such tensor; trunk_file.trunk_tensors names them)."""
    words: list[int] = []
    route = routing(cfg)
    threshold = float_word(2 * cfg.sparsemixer_eps if route == "sparsemixer" else 0.0)
    norm_kind = NORM[cfg.norm]

    def op(name: str, tensors: dict[str, str], **values: int) -> None:
        slots = operand_slots(name)
        words.extend([OP_CODES[name], len(slots)])
        for slot in slots:
            base = slot.removesuffix(".scales")
            words.append(values[slot] if slot in values else index(tensors[base] + slot[len(base):]))

    moe_layer = {l: i for i, l in enumerate(cfg.moe_layer_ids)}
    enc = cfg.encoder_layers
    # an encoder reads its own embedding where the model has one (untied Switch Transformers)
    first = "encoder_embed" if enc and index("encoder_embed") != NONE else "embed"
    op("EMBED", {"embed": first}, scale=float_word(cfg.embedding_scale))
    for l in range(cfg.num_layers):
        p = f"layers.{l}."
        norm = {"norm": p + "attn_norm", "norm_bias": p + "attn_norm_bias"}
        decoder_slot = l - enc  # self- and cross-attention caches: the decoder's layers; the encoder uses slot 0
        if cfg.position == "relative":
            op("REL_ATTENTION", {**norm, "wqkv": p + "wqkv", "wo": p + "wo",
                                 "position_bias": "encoder_position_bias" if l < enc else "decoder_position_bias"},
               layer=max(decoder_slot, 0), norm_kind=norm_kind, bidirectional=int(l < enc))
        else:
            op("ATTENTION", {**norm, "wqkv": p + "wqkv", "qkv_bias": p + "bqkv", "q_norm": p + "q_norm",
                             "k_norm": p + "k_norm", "rope_cos": "rope_cos", "rope_sin": "rope_sin", "wo": p + "wo",
                             "o_bias": p + "bo"},
               layer=l, norm_kind=norm_kind, qk_norm=QK_NORM[cfg.qk_norm])
        if l >= enc and enc:
            op("CROSS_ATTENTION", {"norm": p + "cross_norm", "norm_bias": p + "cross_norm_bias", "wq": p + "cross_wq",
                                   "wkv": p + "cross_wkv", "wo": p + "cross_wo"},
               layer=decoder_slot, norm_kind=norm_kind)
        norm = {"norm": p + "ffn_norm", "norm_bias": p + "ffn_norm_bias"}
        if l in moe_layer:
            op("MOE", {**norm, "router": p + "router", "shared_gate_proj": p + "shared_gate_proj",
                       "shared_up_proj": p + "shared_up_proj", "shared_down_proj": p + "shared_down_proj",
                       "shared_gate": p + "shared_gate"},
               layer=moe_layer[l], norm_kind=norm_kind, route=ROUTE[route], route_threshold=threshold,
               capacity=cfg.expert_capacity)
        else:
            op("DENSE_FFN", {**norm, "gate": p + "dense_gate", "up": p + "dense_up", "down": p + "dense_down"},
               norm_kind=norm_kind, act=ACT[cfg.expert_act])
        if l + 1 == enc:
            op("ENCODER_OUT", {"norm": "encoder_final_norm", "norm_bias": "encoder_final_norm_bias"},
               norm_kind=norm_kind)
            op("EMBED", {"embed": "embed"}, scale=float_word(cfg.embedding_scale))
    op("FINAL", {"norm": "final_norm", "norm_bias": "final_norm_bias",
                 "lm_head": "embed" if cfg.tie_embeddings else "lm_head", "lm_head_bias": "lm_head_bias"},
       norm_kind=norm_kind, scale=float_word(cfg.logit_scale))
    return np.array(words, dtype=np.uint32)


def count_ops(words: np.ndarray) -> int:
    """The number of ops in a program (trunk.bin's header records it, for the runtime's memory plan)."""
    n = at = 0
    while at < len(words):
        at += 2 + int(words[at + 1])
        n += 1
    return n


def c_header() -> str:
    lines = ["/* Generated by compiler/program.py (python -m edgemoe.compiler.program); do not edit. */",
             "#ifndef EM_GENERATED_PROGRAM_H", "#define EM_GENERATED_PROGRAM_H", "",
             f"#define EM_OPERAND_NONE 0x{NONE:X}u", ""]
    for name, code in OP_CODES.items():
        lines.append(f"#define EM_OP_{name} {code}")
    for name in OPS:
        slots = operand_slots(name)
        lines.append(f"#define EM_OP_{name}_OPERANDS {len(slots)}")
        for i, slot in enumerate(slots):
            lines.append(f"#define EM_{name}_{slot.replace('.', '_').upper()} {i}")
    lines.append("")
    lines += [f"#define EM_NORM_{k.upper()} {v}" for k, v in NORM.items()]
    lines += [f"#define EM_QK_NORM_{k.upper()} {v}" for k, v in QK_NORM.items()]
    lines += [f"#define EM_ROUTE_{k.upper()} {v}" for k, v in ROUTE.items()]
    lines += [f"#define EM_ACT_{k.upper()} {v}" for k, v in ACT.items()]
    lines.append("")
    lines += [f'#define EM_KERNEL_{k.upper()} "{v}"' for k, v in KERNELS.items()]
    lines += [f'#define EM_KERNEL_{k.upper()}_FMT "{v.replace("{bits}", "%d")}"' for k, v in EXPERT_KERNELS.items()]
    lines.append("")
    for sig, params in SIGNATURES.items():
        names = [p.lstrip("*") for p in params]
        lines.append(f"#define EM_SIG_{sig.upper()}_ARGS {len(names)}")
        lines += [f"#define EM_SIG_{sig.upper()}_{n.upper()} {i}" for i, n in enumerate(names)]
    lines.append("")
    lines += [f'#define EM_TENSOR_{k.upper()} "{v}"' for k, v in PROFILE_TENSORS.items()]
    lines += ["", "#endif", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(c_header())
