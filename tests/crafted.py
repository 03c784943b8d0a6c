"""Crafting artifacts as an attacker or failing hardware would: fields rewritten, checksums
recomputed so that only the runtime's own bounds checks stand between the file and the kernels."""
from __future__ import annotations

import platform
import shutil
from pathlib import Path

from edgemoe.compiler import cpu_features, expert_image, trunk_file
from edgemoe.compiler.binfmt import crc32, crc32c, pack, size, unpack
from edgemoe.compiler.program import TRUNK_FLAGS

U64 = 2**64
IMAGE_HEADER = size(expert_image.HEADER_FMT) - 4
TRUNK_HEADER = size(trunk_file.HEADER_FMT) - 4
IMAGE_FIELDS = ("magic", "version", "header_bytes", "layers", "experts", "records", "record_bytes", "align", "hidden",
                "inter", "group", "table_offset", "data_offset", "file_bytes", "table_crc", "layout", "compile_id", "act",
                "int4_grid")
TRUNK_FIELDS = ("magic", "version", "header_bytes", "vocab", "hidden", "layers", "heads", "kv_heads", "head_dim",
                "experts", "top_k", "inter", "max_positions", "rope_theta", "norm_eps", "flags", "bos", "eos",
                "n_tensors", "table_offset", "data_offset", "file_bytes", "table_crc", "data_crc", "compile_id",
                "kernels_sha256", "machine", "cpu_features", "shared_inter", "q_lora", "kv_lora", "qk_nope", "v_head",
                "dense_inter", "kv_layers", "cross_layers", "decoder_start", "program_steps")
RECORD_FIELDS = ("layer", "expert", "bits", "crc", "offset", "length", "p0", "p1", "p2", "p3", "p4", "p5",
                 "payload_bytes", "reserved")
TENSOR_FIELDS = ("name", "dtype", "ndim", "s0", "s1", "s2", "s3", "offset", "nbytes", "crc", "bits")


def copy_artifact(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite_header(data: bytearray, fmt: str, fields: tuple, changes: dict) -> None:
    values = dict(zip(fields, unpack(fmt[:-1], data)))
    # a change is a value, or a function of the field's value
    values.update({k: v(values[k]) if callable(v) else v for k, v in changes.items()})
    head = pack(fmt[:-1], *(values[f] for f in fields))
    data[: len(head) + 4] = head + pack("I", crc32(head))


def _rewrite_table(data: bytearray, offset: int, count: int, entry_fmt: str, entry_bytes: int, fields: tuple,
                   index: int, changes: dict) -> int:
    """Rewrites entry `index` of a table; returns the table's new CRC-32."""
    at = offset + index * entry_bytes
    values = dict(zip(fields, unpack(entry_fmt, data, at)))
    values.update(changes)
    data[at : at + entry_bytes] = pack(entry_fmt, *(values[f] for f in fields))
    return crc32(bytes(data[offset : offset + count * entry_bytes]))


def patch_image(art: Path, header: dict | None = None, record: int | None = None, changes: dict | None = None,
                recrc_record: bool = False) -> None:
    """Rewrites experts.bin header fields and/or one record entry, with every CRC recomputed."""
    path = art / "experts.bin"
    data = bytearray(path.read_bytes())
    h = dict(zip(IMAGE_FIELDS, unpack(expert_image.HEADER_FMT[:-1], data)))
    new_header = dict(header or {})
    if record is not None:
        new_header.setdefault("table_crc", _rewrite_table(data, h["table_offset"], h["records"], expert_image.RECORD_FMT,
                                                          expert_image.RECORD_BYTES, RECORD_FIELDS, record, changes))
        if recrc_record:
            r = dict(zip(RECORD_FIELDS, unpack(expert_image.RECORD_FMT, data, h["table_offset"] + record * 64)))
            blob = bytes(data[r["offset"] : r["offset"] + r["length"]])
            crc = crc32c(blob)
            new_header["table_crc"] = _rewrite_table(data, h["table_offset"], h["records"], expert_image.RECORD_FMT,
                                                     expert_image.RECORD_BYTES, RECORD_FIELDS, record, {"crc": crc})
    _rewrite_header(data, expert_image.HEADER_FMT, IMAGE_FIELDS, new_header)
    path.write_bytes(bytes(data))


def patch_trunk(art: Path, header: dict | None = None, tensor: str | None = None, changes: dict | None = None) -> None:
    """Rewrites trunk.bin header fields and/or the named tensor's entry, with every CRC recomputed."""
    path = art / "trunk.bin"
    data = bytearray(path.read_bytes())
    h = dict(zip(TRUNK_FIELDS, unpack(trunk_file.HEADER_FMT[:-1], data)))
    new_header = dict(header or {})
    if tensor is not None:
        names = [unpack(trunk_file.TENSOR_FMT, data, h["table_offset"] + i * 96)[0].rstrip(b"\0").decode()
                 for i in range(h["n_tensors"])]
        new_header["table_crc"] = _rewrite_table(data, h["table_offset"], h["n_tensors"], trunk_file.TENSOR_FMT,
                                                 trunk_file.TENSOR_BYTES, TENSOR_FIELDS, names.index(tensor), changes)
    _rewrite_header(data, trunk_file.HEADER_FMT, TRUNK_FIELDS, new_header)
    path.write_bytes(bytes(data))


def image_records(art: Path) -> list:
    return expert_image.read_table(art / "experts.bin")[1]


def _other_arch_feature() -> tuple[int, str]:
    """A feature bit of the other architecture: this CPU can never have it."""
    other = "aarch64" if platform.machine() == "x86_64" else "x86_64"
    bit, _, name, _ = next(f for f in cpu_features.FEATURES if f[1] == other)
    return bit, name


def image_cases(records):
    """Crafted experts.bin cases: name → (patch_image arguments, the message the runtime refuses it with)."""
    r = records[1]
    p = r.part_offsets
    return {
        "record length near 2^64": (dict(record=1, changes={"length": U64 - 4096}), "length that is not its payload"),
        "record offset + length wraps": (dict(record=1, changes={"offset": U64 - 4096}), "outside the file"),
        "part beyond what the shape fits": (dict(record=1, changes={"p4": r.payload_bytes - 64}),
                                            "part that overlaps another or does not fit"),
        "record shorter than its shape": (dict(record=1, changes={"payload_bytes": p[5]}),
                                          "part that overlaps another or does not fit"),
        "parts overlapping": (dict(record=1, changes={"p2": p[0]}), "part that overlaps another"),
        "undefined bitwidth": (dict(record=1, changes={"bits": 5}), "bitwidth the format does not define"),
        "record out of order": (dict(record=1, changes={"layer": 7}), "out of order"),
        "group zero": (dict(header={"group": 0}), "quantization group"),
        "alignment zero": (dict(header={"align": 0}), "record alignment"),
        "counts far beyond the file": (dict(header={"layers": 1024, "experts": 4096, "records": 1024 * 4096}),
                                       "record table or data region outside the file"),
        "layers times experts wraps": (dict(header={"layers": 65536, "experts": 65536, "records": 0}),
                                       "inconsistent header"),
        "image from another compile": (dict(header={"compile_id": b"\x01" * 16}), "come from different compiles"),
        "undefined INT4 grid": (dict(header={"int4_grid": 2}), "unknown INT4 grid"),
    }


def trunk_cases():
    """Crafted trunk.bin cases: name → (patch_trunk arguments, the message the runtime refuses it with)."""
    bit, name = _other_arch_feature()
    this = platform.machine()
    other_machine = cpu_features.ELF_MACHINES["aarch64" if this == "x86_64" else "x86_64"]
    return {
        "tensor offset wraps": (dict(tensor="final_norm", changes={"offset": U64 - 64}), "outside the data region"),
        "tensor bytes beyond its shape": (dict(tensor="final_norm", changes={"nbytes": U64 - 64}),
                                          "invalid type or shape"),
        "tensor of undefined type": (dict(tensor="final_norm", changes={"dtype": 9}), "invalid type or shape"),
        "tensor count beyond the file": (dict(header={"n_tensors": 60000}), "tensor table"),
        "zero hidden size": (dict(header={"hidden": 0}), "model dimension"),
        "heads not a multiple of KV heads": (dict(header={"kv_heads": 1000}), "attention heads"),
        "top-k above the experts": (dict(header={"top_k": 99}), "top-k"),
        "undefined header flag": (dict(header={"flags": 1 << 30}), "unknown flags"),
        # the flag set, the kernels still reading float32: the runtime looks for the float16 cache's kernels by name
        "a float16 KV cache its kernels do not read": (
            dict(header={"flags": lambda f: f | TRUNK_FLAGS["kv_float16"]}), "lacks em_attention_kv16"),
        "kernels for another architecture": (dict(header={"machine": other_machine}), "kernels are built for"),
        "a CPU feature this CPU lacks": (dict(header={"cpu_features": 1 << bit}), f"lacks: {name}"),
    }
