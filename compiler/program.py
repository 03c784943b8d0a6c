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
                  "rope_cos", "rope_sin", "*wo", "o_bias", "window", "sinks"),
    "MOE": ("layer", "norm_kind", "norm", "norm_bias", "router", "route", "route_threshold", "*shared_gate_proj",
            "*shared_up_proj", "*shared_down_proj", "shared_gate", "expert_layer", "route_scale", "route_groups",
            "route_topk_groups", "group_score", "router_bias", "router_logit_bias", "expert_act", "expert_gate_bias",
            "expert_up_bias", "expert_down_bias", "capacity"),
    "FINAL": ("norm_kind", "norm", "norm_bias", "*lm_head", "lm_head_bias", "scale"),
    "MLA_ATTENTION": ("layer", "norm_kind", "norm", "norm_bias", "*wq_a", "q_a_norm", "*wq", "*wkv_a", "kv_a_norm",
                      "wkv_b", "rope_cos", "rope_sin", "*wo"),
    "DENSE_FFN": ("layer", "norm_kind", "norm", "norm_bias", "*gate_proj", "*up_proj", "*down_proj", "act"),
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
}
# EMBED's and FINAL's "scale": a float32 (its bits as the word) multiplying the embedding row /
# the logits; 1.0 for families without such a factor (MoEConfig.embedding_scale, .logit_scale).
# "norm_kind" (NORM) says which norm "norm" (and, for LayerNorm, "norm_bias") parametrise.
# MOE's "route_threshold": a float32, the sparsemixer's relative margin 2·MoEConfig.sparsemixer_eps
# (0 for the other routing functions). "expert_layer": the index of the layer's experts in experts.bin
# (MoEConfig.moe_layer_ids; dense layers have none); "route_scale": a float32 multiplying the chosen experts' weights;
# "route_groups" / "route_topk_groups": only the experts of the route_topk_groups best of route_groups
# equal groups are eligible (1 / 1: every expert), each group scored as "group_score" (GROUP_SCORE)
# says; "router_bias": [experts] added to the scores for choosing only (NONE: none);
# "router_logit_bias": [experts] added to the router's logits (NONE: none); "expert_act" (ACT)
# picks the routed experts' kernels (EXPERT_KERNELS, by expert_kernel_roles), and with the biased ones
# "expert_gate_bias", "expert_up_bias" [experts, inter] and "expert_down_bias" [experts, hidden]
# are their biases, the row of expert e passed with its weights. MOE's "capacity" is how many tokens
# of one pass (the encoder's input, or one decoded token) an expert takes before the rest skip the
# experts (MoEConfig.expert_capacity; 0: no limit).
# ATTENTION's "window": the positions a query attends to, its own included (0: all; MoEConfig.layer_windows);
# "sinks": [heads] logits joining each head's softmax denominator (NONE: none).
# MLA_ATTENTION: multi-head latent attention (MoEConfig.attention "mla"); "wq_a" and "q_a_norm" the q
# bottleneck (NONE: wq reads the normalised input), "wkv_b" float32 [heads · (nope + v), kv_lora_rank].
# DENSE_FFN: a dense layer's MLP at the trunk's bitwidth; "act" an ACT: SwiGLU (gate_proj present) or
# ReLU (gate_proj NONE: down(relu(up x))).
OP_CODES = {name: i + 1 for i, name in enumerate(OPS)}

NORM = {"rms": 0, "layer": 1}  # the norm_kind operands: MoEConfig.norm
QK_NORM = {"none": 0, "head": 1, "full": 2}  # ATTENTION's qk_norm operand
# MOE's route operand: the score function, and whether the chosen weights are renormalised; topk_softmax:
# a softmax over the top-k logits alone
ROUTE = {"softmax_topk": 0, "softmax_topk_renorm": 1, "sparsemixer": 2, "sigmoid_topk": 3, "sigmoid_topk_renorm": 4,
         "topk_softmax": 5}
GROUP_SCORE = {"max": 0, "top2": 1}  # MOE's group_score operand: a group's best score, or its two best summed
# The activation of an expert or dense MLP (MoEConfig.expert_activation): MOE's expert_act and DENSE_FFN's
# act operands and the expert image header's act (which records, of three matrices or two, it holds);
# "clamped_swiglu" with its biases: GPT-OSS's experts; "relu": two matrices, Switch Transformers'
ACT = {"swiglu": 0, "clamped_swiglu": 1, "relu": 2}

# kernel role → symbol: the names decode_kernels gives its PrimFuncs and the runtime resolves
KERNELS = {
    "rmsnorm": "em_rmsnorm", "layernorm": "em_layernorm", "qkv": "em_qkv", "qkv_bias": "em_qkv_bias",
    "qk_norm": "em_qk_norm", "rope": "em_rope", "attention": "em_attention", "add": "em_add", "o_proj": "em_o_proj",
    "router": "em_router", "shared_gate": "em_shared_gate", "shared_gate_up": "em_shared_gate_up",
    "shared_down": "em_shared_down", "lm_head": "em_lm_head", "lm_head_bias": "em_lm_head_bias",
    "mla_q_a": "em_mla_q_a", "mla_q_a_norm": "em_mla_q_a_norm", "mla_q": "em_mla_q", "mla_kv_a": "em_mla_kv_a",
    "mla_kv_norm": "em_mla_kv_norm", "mla_rope": "em_mla_rope", "mla_absorb": "em_mla_absorb",
    "mla_attention": "em_mla_attention", "mla_v": "em_mla_v", "dense_gate_up": "em_dense_gate_up",
    "dense_down": "em_dense_down",
    "attention_sinks": "em_attention_sinks", "router_bias": "em_router_bias",
    "attention_bias": "em_attention_bias", "cross_q": "em_cross_q", "cross_kv": "em_cross_kv",
    "dense_up_relu": "em_dense_up_relu",
}
EXPERT_KERNELS = {"expert_gate_up": "em_expert_gate_up_w{bits}", "expert_down": "em_expert_down_w{bits}",
                  "expert_gate_up_clamped_bias": "em_expert_gate_up_clamped_bias_w{bits}",
                  "expert_down_bias": "em_expert_down_bias_w{bits}",
                  "expert_up_relu": "em_expert_up_relu_w{bits}"}
# A prompt's batch (runtime_c/src/prefill.c) takes BATCH_ROWS of its tokens through one call of a
# matrix kernel where the artifact has its batched form (kernels.batched_kernels: the integer-dot
# kernels of a hosted target's experts, attention projections and resident MLPs): the symbol with
# BATCH_SUFFIX, its inputs, residuals and outputs that many rows, each row the one-row kernel's bits.
BATCH_ROWS = 4
BATCH_SUFFIX = "_b{batch}"
BATCHED_KERNELS = ("qkv", "qkv_bias", "o_proj", "shared_gate_up", "shared_down", "dense_gate_up", "dense_down",
                   "dense_up_relu")  # the KERNELS roles with a batched form
# ACT → the EXPERT_KERNELS roles (gate-up — for ReLU the up projection alone —, down) of routed experts
# with that activation; the clamped SwiGLU's take the experts' biases (SwiGLU and ReLU experts have none)
EXPERT_ACT_KERNELS = {"swiglu": ("expert_gate_up", "expert_down"),
                      "clamped_swiglu": ("expert_gate_up_clamped_bias", "expert_down_bias"),
                      "relu": ("expert_up_relu", "expert_down")}

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
    "mla_rope": ("q", "kr", "cos", "sin", "q_rot", "k_rot"),
    "mla_absorb": ("q", "wkv_b", "q_lat"),
    "mla_attention": ("q_lat", "q_rot", "latent", "k_rot", "o_lat"),
    "mla_v": ("o_lat", "wkv_b", "att"),
    "attention_sinks": ("q", "kc", "vc", "sink", "o"),
    "ffn_gate_up_bias": ("x", "*gate", "*up", "gate_bias", "up_bias", "h"),
    "ffn_down_bias": ("h", "*down", "down_bias", "res", "weight", "y"),
    "attention_bias": ("q", "kc", "vc", "bias", "o"),
    "ffn_up": ("x", "*up", "h"),
}
# attention parameters that read the KV cache: float32, or float16 where the artifact keeps its cache so
# (KV_CACHE_DTYPES; trunk.bin's TRUNK_FLAGS["kv_float16"])
KV_CACHE_PARAMS = ("kc", "vc", "latent", "k_rot")
KV_CACHE_DTYPES = ("float32", "float16")
# The KERNELS roles that read the KV cache: their symbols name its element type (the role's name, then
# KV_CACHE_SUFFIX), so the runtime resolves the kernels that read the cache trunk.bin's flags say it holds
# and a library built for the other type is refused as lacking them, before any call
KV_CACHE_ROLES = ("attention", "attention_sinks", "mla_attention")
KV_CACHE_SUFFIX = {"float32": "", "float16": "_kv16"}
# trunk.bin header flags (bit → what the artifact holds)
TRUNK_FLAGS = {
    "tiles": 4,  # the quantized matrices are in the tiles layout (quantize.py)
    "int4_integer": 8,  # INT4 matrices are on the integer grid (quantize.GRIDS), else on the half-integer one
    "kv_float16": 16,  # the KV cache holds float16 (its kernels read float16 keys and values)
}
# kernel role (KERNELS, EXPERT_KERNELS) → its signature
KERNEL_SIGNATURES = {
    "rmsnorm": "norm", "layernorm": "norm_bias", "qkv": "matvec", "qkv_bias": "matvec_residual",
    "qk_norm": "qk_norm", "rope": "rope", "attention": "attention", "add": "add", "o_proj": "matvec_residual",
    "router": "matvec", "shared_gate": "matvec", "shared_gate_up": "ffn_gate_up", "shared_down": "ffn_down",
    "lm_head": "matvec", "lm_head_bias": "matvec_residual", "expert_gate_up": "ffn_gate_up",
    "expert_down": "ffn_down", "mla_q_a": "matvec", "mla_q_a_norm": "norm", "mla_q": "matvec", "mla_kv_a": "matvec",
    "mla_kv_norm": "norm", "mla_rope": "mla_rope", "mla_absorb": "mla_absorb", "mla_attention": "mla_attention",
    "mla_v": "mla_v", "dense_gate_up": "ffn_gate_up", "dense_down": "ffn_down",
    "attention_sinks": "attention_sinks", "router_bias": "matvec_residual",
    "expert_gate_up_clamped_bias": "ffn_gate_up_bias", "expert_down_bias": "ffn_down_bias",
    "attention_bias": "attention_bias", "cross_q": "matvec", "cross_kv": "matvec",
    "dense_up_relu": "ffn_up", "expert_up_relu": "ffn_up",
}

# tensors the runtime finds by name (the routing profile, when compiled with calibration text)
PROFILE_TENSORS = {
    "path_table": "profile.path_table", "frequency": "profile.frequency", "fitted_router": "profile.fitted_router",
    "fitted_router_prev": "profile.fitted_router_prev", "fitted_router_bias": "profile.fitted_router_bias",
    "fitted_ahead": "profile.fitted_ahead", "fitted_ahead_prev": "profile.fitted_ahead_prev",
    "fitted_ahead_bias": "profile.fitted_ahead_bias",
}


def kernel_symbol(role: str, kv_cache: str = "float32") -> str:
    """The symbol of a KERNELS role in an artifact whose KV cache holds `kv_cache` elements."""
    return KERNELS[role] + (KV_CACHE_SUFFIX[kv_cache] if role in KV_CACHE_ROLES else "")


def kernel_role(symbol: str) -> str:
    """The role (a KERNELS or EXPERT_KERNELS key) of a kernel symbol (or of its batched or KV-cache form)."""
    batched = re.escape(BATCH_SUFFIX).replace(re.escape("{batch}"), "[0-9]+")
    for role, name in KERNELS.items():
        if name == symbol or role in BATCHED_KERNELS and re.fullmatch(re.escape(name) + batched, symbol):
            return role
        if role in KV_CACHE_ROLES and symbol in (kernel_symbol(role, t) for t in KV_CACHE_DTYPES):
            return role
    for role, pattern in EXPERT_KERNELS.items():
        if re.fullmatch(re.escape(pattern).replace(re.escape("{bits}"), "[0-9]+") + f"({batched})?", symbol):
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
    if cfg.routing == "topk_softmax":
        return "topk_softmax"
    if cfg.routing not in ("softmax", "sigmoid"):
        raise ValueError(f"unknown routing {cfg.routing!r}; supported: softmax, sigmoid, topk_softmax, sparsemixer")
    return f"{cfg.routing}_topk_renorm" if cfg.norm_topk_prob else f"{cfg.routing}_topk"


def expert_kernel_roles(cfg) -> tuple[str, str]:
    """The EXPERT_KERNELS roles (gate-up, down) of a MoEConfig's routed experts: plain SwiGLU, or the
    clamped SwiGLU with biases; other combinations have no kernels and are refused."""
    if cfg.expert_activation not in ACT:
        raise ValueError(f"unknown expert activation {cfg.expert_activation!r}; supported: {', '.join(ACT)}")
    if (cfg.expert_activation == "clamped_swiglu") != cfg.expert_bias:
        raise ValueError(f"expert activation {cfg.expert_activation!r} with expert_bias={cfg.expert_bias} has no "
                         "kernels: SwiGLU experts come without biases, clamped SwiGLU ones with them")
    return EXPERT_ACT_KERNELS[cfg.expert_activation]


def emit_program(cfg, index) -> np.ndarray:
    """The layer program of a model: `index(name)` gives a trunk tensor's table index (NONE if the
    trunk has no such tensor; trunk_file.trunk_tensors names them)."""
    words: list[int] = []
    route = routing(cfg)
    threshold = float_word(2 * cfg.sparsemixer_eps if route == "sparsemixer" else 0.0)
    norm_kind = NORM[cfg.norm]
    expert_kernel_roles(cfg)  # a combination without kernels refused before any word is written

    def op(name: str, tensors: dict[str, str], **values: int) -> None:
        slots = operand_slots(name)
        words.extend([OP_CODES[name], len(slots)])
        for slot in slots:
            base = slot.removesuffix(".scales")
            words.append(values[slot] if slot in values else index(tensors[base] + slot[len(base):]))

    moe_index = {l: m for m, l in enumerate(cfg.moe_layer_ids)}
    enc = cfg.encoder_layers
    # an encoder reads its own embedding where the model has one (untied Switch Transformers)
    first = "encoder_embed" if enc and index("encoder_embed") != NONE else "embed"
    op("EMBED", {"embed": first}, scale=float_word(cfg.embedding_scale))
    for l in range(cfg.num_layers):
        p = f"layers.{l}."
        norm = {"norm": p + "attn_norm", "norm_bias": p + "attn_norm_bias"}
        decoder_slot = l - enc  # self- and cross-attention caches: the decoder's layers; the encoder uses slot 0
        if cfg.attention == "mla":
            op("MLA_ATTENTION", {**norm, "wq_a": p + "wq_a", "q_a_norm": p + "q_a_norm", "wq": p + "wq",
                                 "wkv_a": p + "wkv_a", "kv_a_norm": p + "kv_a_norm", "wkv_b": p + "wkv_b",
                                 "rope_cos": "rope_cos", "rope_sin": "rope_sin", "wo": p + "wo"},
               layer=l, norm_kind=norm_kind)
        elif cfg.position == "relative":
            op("REL_ATTENTION", {**norm, "wqkv": p + "wqkv", "wo": p + "wo",
                                 "position_bias": "encoder_position_bias" if l < enc else "decoder_position_bias"},
               layer=max(decoder_slot, 0), norm_kind=norm_kind, bidirectional=int(l < enc))
        else:
            op("ATTENTION", {**norm, "wqkv": p + "wqkv", "qkv_bias": p + "bqkv", "q_norm": p + "q_norm",
                             "k_norm": p + "k_norm", "rope_cos": "rope_cos", "rope_sin": "rope_sin", "wo": p + "wo",
                             "o_bias": p + "bo", "sinks": p + "sinks"},
               layer=l, norm_kind=norm_kind, qk_norm=QK_NORM[cfg.qk_norm],
               window=cfg.layer_windows[l] if cfg.layer_windows is not None else 0)
        if l >= enc and enc:
            op("CROSS_ATTENTION", {"norm": p + "cross_norm", "norm_bias": p + "cross_norm_bias", "wq": p + "cross_wq",
                                   "wkv": p + "cross_wkv", "wo": p + "cross_wo"},
               layer=decoder_slot, norm_kind=norm_kind)
        ffn_norm = {"norm": p + "ffn_norm", "norm_bias": p + "ffn_norm_bias"}
        if l in moe_index:
            op("MOE", {**ffn_norm, "router": p + "router", "shared_gate_proj": p + "shared_gate_proj",
                       "shared_up_proj": p + "shared_up_proj", "shared_down_proj": p + "shared_down_proj",
                       "shared_gate": p + "shared_gate", "router_bias": p + "router_bias",
                       "router_logit_bias": p + "router_logit_bias", "expert_gate_bias": p + "expert_gate_bias",
                       "expert_up_bias": p + "expert_up_bias", "expert_down_bias": p + "expert_down_bias"},
               layer=l, norm_kind=norm_kind, route=ROUTE[route], route_threshold=threshold,
               expert_layer=moe_index[l], route_scale=float_word(cfg.route_scale), route_groups=cfg.route_groups,
               route_topk_groups=cfg.route_topk_groups, group_score=GROUP_SCORE[cfg.route_group_score],
               expert_act=ACT[cfg.expert_activation], capacity=cfg.expert_capacity)
        else:
            op("DENSE_FFN", {**ffn_norm, "gate_proj": p + "dense_gate_proj", "up_proj": p + "dense_up_proj",
                             "down_proj": p + "dense_down_proj"},
               layer=l, norm_kind=norm_kind, act=ACT[cfg.expert_activation])
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
    lines += [f"#define EM_GROUP_SCORE_{k.upper()} {v}" for k, v in GROUP_SCORE.items()]
    lines += [f"#define EM_ACT_{k.upper()} {v}" for k, v in ACT.items()]
    lines.append("")
    lines += [f'#define EM_KERNEL_{k.upper()} "{v}"' for k, v in KERNELS.items()]
    fmt = {k: v.replace("{bits}", "%d") for k, v in EXPERT_KERNELS.items()}
    lines += [f'#define EM_KERNEL_{k.upper()}_FMT "{v}"' for k, v in fmt.items()]
    lines.append(f"#define EM_ACT_COUNT {len(ACT)}")
    lines.append(f"#define EM_BATCH_ROWS {BATCH_ROWS} /* rows of a batched kernel */")
    lines.append(f'#define EM_BATCH_SUFFIX "{BATCH_SUFFIX.format(batch=BATCH_ROWS)}"')
    lines.append("/* appended to the symbols of the kernels that read a float16 KV cache (attention, attention_sinks,"
                 " mla_attention) */")
    lines.append(f'#define EM_KV_FLOAT16_SUFFIX "{KV_CACHE_SUFFIX["float16"]}"')
    rows = ", ".join(f'{{"{fmt[g]}", "{fmt[d]}"}}' for g, d in (EXPERT_ACT_KERNELS[a] for a in ACT))
    lines.append("/* by EM_ACT_*: the printf formats of its gate-up and down kernels' symbols */")
    lines.append(f"#define EM_ACT_KERNEL_FMTS {{{rows}}}")
    lines.append("")
    for sig, params in SIGNATURES.items():
        names = [p.lstrip("*") for p in params]
        lines.append(f"#define EM_SIG_{sig.upper()}_ARGS {len(names)}")
        lines += [f"#define EM_SIG_{sig.upper()}_{n.upper()} {i}" for i, n in enumerate(names)]
    widest = max(sum(2 if p.startswith("*") else 1 for p in params) for params in SIGNATURES.values())
    lines.append(f"#define EM_SIG_MAX_PARAMS {widest} /* kernel parameters of the widest signature, matrices quantized */")
    lines.append("")
    lines += [f'#define EM_TENSOR_{k.upper()} "{v}"' for k, v in PROFILE_TENSORS.items()]
    lines.append("")
    lines += [f"#define EM_TRUNK_FLAG_{k.upper()} {v}u" for k, v in TRUNK_FLAGS.items()]
    lines.append(f"#define EM_TRUNK_FLAGS_KNOWN 0x{sum(TRUNK_FLAGS.values()):X}u")
    lines += ["", "#endif", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(c_header())
