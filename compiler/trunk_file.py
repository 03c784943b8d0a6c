"""The trunk file: model hyper-parameters and every resident (non-expert) tensor.

The projection matrices (attention qkv and output, embedding / LM head) are stored quantized at
the artifact's trunk bitwidth in the experts' packed layout (rows or tiles), as two tensors: NAME (the codes, with
the bitwidth in its table entry) and NAME.scales; norms, the router and the tables stay float32.

Layout (little-endian; docs/FORMAT.md is the normative description):
  [0, 256)   header (HEADER_FMT) padded with zeros
  table      num_tensors × 96-byte entries (TENSOR_FMT)
  data       each tensor 64-byte aligned
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..models import MoEModel
from ..models.encoder_decoder import position_bias_table
from ..models.reference import rope_tables
from ..models.stored_tensor import RowStack
from .binfmt import align_up, crc32, pack, size, unpack
from .program import NONE, PROFILE_TENSORS, TRUNK_FLAGS, count_ops, emit_program
from .quantize import grid_at, quantize

MAGIC = b"EMOTRUNK"
VERSION = 6  # 3: compile id, the kernels' SHA-256, their machine and CPU features; 4: MLA and dense-layer sizes;
# 5: KV-cache and cross-attention layers, the decoder start token (encoder-decoder models), the program's ops;
# 6: the int4_integer flag (program.TRUNK_FLAGS; kv_float16 came later: earlier runtimes refuse it as unknown)
HEADER_BYTES = 256
TENSOR_ALIGN = 64
# magic, version, header_bytes, vocab, hidden, layers, heads, kv_heads, head_dim, experts, top_k,
# inter, max_positions, rope_theta, norm_eps, flags, bos, eos, n_tensors, table_offset,
# data_offset, file_bytes, table_crc, data_crc, compile_id, kernels_sha256, machine, cpu_features,
# shared_expert_intermediate, q_lora_rank, kv_lora_rank, qk_nope_head_dim, v_head_dim (the four 0
# without multi-head latent attention), dense_intermediate, kv_layers, cross_layers, decoder_start,
# program_steps, header_crc
HEADER_FMT = "8sIIIIIIIIIIIIffIiiIQQQII16s32sIIIIIIIIIIiII"
# name, dtype, ndim, shape[4], offset, bytes, crc, bits (of a quantized matrix's codes; 0 otherwise)
TENSOR_FMT = "48sII4IQQII"
TENSOR_BYTES = 96
DTYPES = {np.dtype(np.float32): 0, np.dtype(np.float16): 1, np.dtype(np.int8): 2, np.dtype(np.uint32): 3}
# the matrices stored at the trunk bitwidth (name or suffix)
# (MLA's wkv_b stays float32: its key half is read transposed, folded into the query)
QUANTIZED = ("embed", "encoder_embed", "wqkv", "wo", "lm_head", "shared_gate_proj", "shared_up_proj", "shared_down_proj",
             "wq_a", "wq", "wkv_a", "dense_gate_proj", "dense_up_proj", "dense_down_proj", "cross_wq", "cross_wkv",
             "cross_wo")
assert size(TENSOR_FMT) == TENSOR_BYTES


def trunk_tensors(model: MoEModel, max_positions: int, profile=None) -> list[tuple[str, np.ndarray]]:
    """The resident tensors in file order, under the names the layer program (program.py) refers to;
    with a RoutingProfile, also the predictor's tables and the expert frequencies."""
    cfg = model.config
    out = [("embed", model.embed)]
    if model.encoder_embed is not None:
        out.append(("encoder_embed", model.encoder_embed))
    for i, l in enumerate(model.layers):
        p = f"layers.{i}."
        out.append((p + "attn_norm", l.attn_norm))
        if cfg.norm == "layer":
            out.append((p + "attn_norm_bias", l.attn_norm_bias))
        if cfg.attention == "mla":
            if cfg.q_lora_rank:
                out += [(p + "wq_a", l.wq_a), (p + "q_a_norm", l.q_a_norm)]
            out += [(p + "wq", l.wq), (p + "wkv_a", l.wkv_a), (p + "kv_a_norm", l.kv_a_norm), (p + "wkv_b", l.wkv_b)]
        else:
            if cfg.attention_sinks:
                out.append((p + "sinks", l.sinks))
            out.append((p + "wqkv", RowStack([l.wq, l.wk, l.wv])))
        if cfg.qkv_bias:
            out.append((p + "bqkv", np.concatenate([l.bq, l.bk, l.bv])))
        if cfg.qk_norm != "none":
            out += [(p + "q_norm", l.q_norm), (p + "k_norm", l.k_norm)]
        out.append((p + "wo", l.wo))
        if cfg.o_bias:
            out.append((p + "bo", l.bo))
        out.append((p + "ffn_norm", l.ffn_norm))
        if cfg.norm == "layer":
            out.append((p + "ffn_norm_bias", l.ffn_norm_bias))
        if l.cwq is not None:
            out += [(p + "cross_norm", l.cross_norm), (p + "cross_wq", l.cwq),
                    (p + "cross_wkv", RowStack([l.cwk, l.cwv])), (p + "cross_wo", l.cwo)]
        if l.dense is not None:  # a ReLU MLP has no gate
            out += [(p + "dense_" + n, w) for n, w in (("gate_proj", l.dense.w_gate), ("up_proj", l.dense.w_up),
                                                       ("down_proj", l.dense.w_down)) if w is not None]
            continue
        out.append((p + "router", l.router))
        if l.router_bias is not None:
            out.append((p + "router_bias", l.router_bias))
        if cfg.router_logit_bias:
            out.append((p + "router_logit_bias", l.router_logit_bias))
        if cfg.expert_bias:
            out += [(p + "expert_gate_bias", l.expert_gate_bias), (p + "expert_up_bias", l.expert_up_bias),
                    (p + "expert_down_bias", l.expert_down_bias)]
        if l.shared is not None:
            out += [(p + "shared_gate_proj", l.shared.w_gate), (p + "shared_up_proj", l.shared.w_up),
                    (p + "shared_down_proj", l.shared.w_down)]
            if l.shared_gate is not None:
                out.append((p + "shared_gate", l.shared_gate))
    out.append(("final_norm", model.final_norm))
    if cfg.norm == "layer":
        out.append(("final_norm_bias", model.final_norm_bias))
    if cfg.position == "relative":
        out += [("encoder_final_norm", model.encoder_final_norm),
                ("encoder_position_bias", position_bias_table(model, True, max_positions)),
                ("decoder_position_bias", position_bias_table(model, False, max_positions))]
    else:
        out += list(zip(("rope_cos", "rope_sin"), rope_tables(cfg, max_positions)))
    if not cfg.tie_embeddings:
        out.append(("lm_head", model.lm_head))
    if cfg.lm_head_bias:
        out.append(("lm_head_bias", model.lm_head_bias))
    if profile is not None:
        names = PROFILE_TENSORS
        out.append((names["path_table"], profile.path_table().reshape(cfg.num_moe_layers * cfg.num_experts, -1)))
        out.append((names["frequency"], profile.frequency))
        H = cfg.hidden_size
        for name, fit in (("fitted_router", profile.fitted_router), ("fitted_ahead", profile.fitted_ahead)):
            if fit is not None:
                out.append((names[name], fit[:, :, :H].reshape(-1, H)))
                out.append((names[name + "_prev"], fit[:, :, H : 2 * H].reshape(-1, H)))
                out.append((names[name + "_bias"], fit[:, :, -1]))
    return out


def header_layers(cfg) -> tuple[int, int, int]:
    """The header's layers (every layer of both stacks, dense ones included; the expert image holds
    those with experts), KV-cache layers (the decoder's self-attention layers) and cross-attention layers."""
    decoder = cfg.num_layers - cfg.encoder_layers
    return cfg.num_layers, decoder, decoder if cfg.encoder_layers else 0


def _stored(tensors: list[tuple[str, np.ndarray]], bits: int, group: int, layout: str,
            int4_grid: str) -> list[tuple[str, np.ndarray, int]]:
    """(name, array as stored, bits): the projection matrices quantized at `bits` (32 keeps float32;
    INT4 on `int4_grid`)."""
    out = []
    for name, a in tensors:
        if bits != 32 and name.rsplit(".", 1)[-1] in QUANTIZED:
            q = quantize(a, bits, group, layout, grid=grid_at(bits, int4_grid))
            out += [(name, q.packed, bits), (name + ".scales", q.scales, 0)]
        else:
            out.append((name, np.ascontiguousarray(a, dtype=np.float32), 0))
    return out


def _table(path: Path) -> dict[str, tuple]:
    """name → TENSOR_FMT fields of every tensor trunk.bin holds (nothing checked)."""
    data = Path(path).read_bytes()[:HEADER_BYTES]
    n_tensors, table_offset = unpack(HEADER_FMT[:-1], data)[18:20]
    with open(path, "rb") as f:
        f.seek(table_offset)
        table = f.read(n_tensors * TENSOR_BYTES)
    fields = (unpack(TENSOR_FMT, table, i * TENSOR_BYTES) for i in range(n_tensors))
    return {v[0].rstrip(b"\0").decode(): v for v in fields}


def tensor_sizes(path: Path) -> dict[str, int]:
    """name → bytes of every tensor trunk.bin holds (its table; nothing checked: for measurements of an
    artifact the runtime accepts)."""
    return {name: v[8] for name, v in _table(path).items()}


def read_float_tensor(path: Path, name: str) -> np.ndarray:
    """The float32 tensor `name` of trunk.bin as stored (e.g. the routing profile's frequency, which
    offline replays of the runtime's cache need bit for bit)."""
    v = _table(path).get(name)
    if v is None or v[1] != 0:
        raise ValueError(f"{path} holds no float32 tensor {name!r}")
    shape = v[3:3 + v[2]]
    with open(path, "rb") as f:
        f.seek(v[7])
        return np.frombuffer(f.read(v[8]), np.float32).reshape(shape).copy()


@dataclass(frozen=True)
class ArtifactIdentity:
    """What ties an artifact's files together and to the machine that may run them: a compile id
    (in every file's header), kernels.so's SHA-256 (checked before it is loaded), the kernels'
    ELF machine and the CPU features they need (compiler/cpu_features.py)."""

    compile_id: bytes = bytes(16)
    kernels_sha256: bytes = bytes(32)
    machine: int = 0
    cpu_features: int = 0


def write_trunk(path: Path, model: MoEModel, max_positions: int, bits: int, group: int, layout: str = "rows",
                profile=None, identity: ArtifactIdentity = ArtifactIdentity(), int4_grid: str = "half",
                kv_cache: str = "float32") -> int:
    """Write the trunk file with its matrices at `bits` in `layout` (INT4 on `int4_grid`), its header naming
    the KV cache's element type `kv_cache` (program.KV_CACHE_DTYPES); return its size in bytes."""
    cfg = model.config
    tensors = _stored(trunk_tensors(model, max_positions, profile), bits, group, layout, int4_grid)
    where = {name: i for i, (name, _, _) in enumerate(tensors)}
    program = emit_program(cfg, lambda name: where.get(name, NONE))
    tensors.append(("program", program, 0))
    table_offset = HEADER_BYTES
    data_offset = align_up(table_offset + len(tensors) * TENSOR_BYTES, TENSOR_ALIGN)
    entries, data, pos = [], bytearray(), 0
    for name, a, a_bits in tensors:
        pad = align_up(pos, TENSOR_ALIGN) - pos
        data += bytes(pad)
        pos += pad
        raw = a.tobytes()
        shape = list(a.shape) + [0] * (4 - a.ndim)
        entries.append(pack(TENSOR_FMT, name.encode(), DTYPES[a.dtype], a.ndim, *shape, data_offset + pos, len(raw),
                            crc32(raw), a_bits))
        data += raw
        pos += len(raw)
    table = b"".join(entries)
    flags = (TRUNK_FLAGS["tiles"] if layout == "tiles" and bits != 32 else 0) | \
        (TRUNK_FLAGS["int4_integer"] if bits == 4 and int4_grid == "integer" else 0) | \
        (TRUNK_FLAGS["kv_float16"] if kv_cache == "float16" else 0)
    file_bytes = data_offset + len(data)
    layers, kv_layers, cross_layers = header_layers(cfg)
    head = pack(HEADER_FMT[:-1], MAGIC, VERSION, HEADER_BYTES, cfg.vocab_size, cfg.hidden_size, layers,
                cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_experts, cfg.top_k, cfg.expert_intermediate,
                max_positions, cfg.rope_theta, cfg.norm_eps, flags,
                -1 if cfg.bos_token_id is None else cfg.bos_token_id,
                -1 if cfg.eos_token_id is None else cfg.eos_token_id,
                len(tensors), table_offset, data_offset, file_bytes, crc32(table), crc32(bytes(data)),
                identity.compile_id, identity.kernels_sha256, identity.machine, identity.cpu_features,
                cfg.shared_expert_intermediate, cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.v_head_dim,
                cfg.dense_intermediate if cfg.dense_layers else 0, kv_layers, cross_layers,
                -1 if cfg.decoder_start_token_id is None else cfg.decoder_start_token_id, count_ops(program))
    head += pack("I", crc32(head))
    with open(path, "wb") as f:
        f.write(head + bytes(HEADER_BYTES - len(head)))
        f.write(table + bytes(data_offset - table_offset - len(table)))
        f.write(data)
    return file_bytes
