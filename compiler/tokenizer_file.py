"""tokenizer.bin: what the C runtime needs to turn text into token ids and back without Python,
for byte-level BPE tokenizers with GPT-2's pre-tokenizer (GPT-2, GPT-NeoX/OLMoE, the bundled
model). Written from the checkpoint's tokenizer.json when it is of that kind; runtime_c/src/
tokenizer.c reads it and must give the ids `tokenizers` gives (tests/test_tokenizer.py).

Layout (little-endian):
  [0, 40)   magic "EMOTOKEN", version, tokens N, merges M, added tokens A, blob bytes B,
            byte→token table offset, CRC-32 of everything after the header, CRC-32 of [0, 36)
  then      N × (offset u32, length u32) of each token's bytes in the blob
            256 × u32: the token of each single byte
            M × (left u32, right u32, merged u32), by rank
            A × u32: added tokens (matched literally in the text before pre-tokenization)
            the blob: every token's bytes (byte-level symbols mapped back to bytes)

The pre-tokenizer's character classes (letters, numbers, white space) come from Python's
unicodedata through runtime_c/src/generated/unicode_classes.h
(python -m edgemoe.compiler.tokenizer_file > runtime_c/src/generated/unicode_classes.h).
"""
from __future__ import annotations

import json
import sys
import unicodedata
from pathlib import Path

import numpy as np

from .binfmt import crc32, pack

MAGIC = b"EMOTOKEN"
VERSION = 1
HEADER_FMT = "8sIIIIIII"  # magic, version, tokens, merges, added, blob bytes, byte table offset, body crc (+ header crc)
HEADER_BYTES = 40
# Unicode White_Space (the \s of the regex engines tokenizers uses)
WHITE_SPACE = [(0x09, 0x0D), (0x20, 0x20), (0x85, 0x85), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A),
               (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000)]


def byte_symbols() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character standing for each byte → the byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def unsupported_reason(spec: dict) -> str | None:
    """Why the C runtime cannot reproduce this tokenizer.json, or None if it can."""
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    post, dec = spec.get("post_processor"), spec.get("decoder") or {}
    if model.get("type") != "BPE":
        return f"its model is {model.get('type')!r}, not byte-level BPE"
    if model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") \
            or model.get("dropout") or model.get("ignore_merges"):
        return "its BPE uses byte fallback, word prefixes or suffixes, dropout or ignore_merges"
    if spec.get("normalizer") is not None:
        return "it normalizes the text first"
    if pre != {**pre, "type": "ByteLevel", "add_prefix_space": False, "use_regex": True}:
        return "its pre-tokenizer is not GPT-2's byte-level split (without a prefix space)"
    if dec.get("type") != "ByteLevel":
        return "its decoder is not byte-level"
    if post is not None and not (post.get("type") == "ByteLevel" or
                                 (post.get("type") == "TemplateProcessing" and post.get("single") ==
                                  [{"Sequence": {"id": "A", "type_id": 0}}])):
        return "its post-processor adds tokens"
    return None


def write_tokenizer(tokenizer_json: Path, out: Path) -> str | None:
    """Writes tokenizer.bin for a supported tokenizer.json; returns why not otherwise (nothing written)."""
    spec = json.loads(Path(tokenizer_json).read_text())
    why = unsupported_reason(spec)
    if why:
        return why
    symbols, model = byte_symbols(), spec["model"]
    vocab: dict[str, int] = model["vocab"]
    added = {a["content"]: a["id"] for a in spec.get("added_tokens", [])}
    n = max(list(vocab.values()) + list(added.values())) + 1
    token_bytes: list[bytes] = [b""] * n
    for text, i in vocab.items():
        if any(c not in symbols for c in text):
            return f"token {text!r} is not made of byte-level symbols"
        token_bytes[i] = bytes(symbols[c] for c in text)
    for text, i in added.items():
        token_bytes[i] = text.encode()
    single = {b: vocab.get(next(c for c, v in symbols.items() if v == b)) for b in range(256)}
    if any(v is None for v in single.values()):
        return "its vocabulary lacks some of the 256 single-byte tokens"
    merges = []
    for m in model["merges"]:
        left, right = m.split(" ", 1) if isinstance(m, str) else m
        merged = vocab.get(left + right)
        if left not in vocab or right not in vocab or merged is None:
            return f"merge {left!r} + {right!r} names a token outside the vocabulary"
        merges.append((vocab[left], vocab[right], merged))
    offsets, blob = [], bytearray()
    for b in token_bytes:
        offsets.append((len(blob), len(b)))
        blob += b
    body = np.array(offsets, np.uint32).tobytes() + np.array([single[b] for b in range(256)], np.uint32).tobytes() \
        + np.array(merges, np.uint32).reshape(-1, 3).tobytes() + np.array(sorted(added.values()), np.uint32).tobytes() \
        + bytes(blob)
    head = pack(HEADER_FMT, MAGIC, VERSION, n, len(merges), len(added), len(blob), HEADER_BYTES + 8 * n, crc32(body))
    Path(out).write_bytes(head + pack("I", crc32(head)) + body)
    return None


def _ranges(predicate) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for cp in range(0x110000):
        if predicate(chr(cp)):
            if out and out[-1][1] == cp - 1:
                out[-1][1] = cp
            else:
                out.append([cp, cp])
    return [tuple(r) for r in out]


def unicode_table_header() -> str:
    letters = _ranges(lambda c: unicodedata.category(c).startswith("L"))
    numbers = _ranges(lambda c: unicodedata.category(c).startswith("N"))
    lines = [f"/* Generated by compiler/tokenizer_file.py from Unicode {unicodedata.unidata_version} "
             "(python -m edgemoe.compiler.tokenizer_file); do not edit. */",
             "#ifndef EM_GENERATED_UNICODE_CLASSES_H", "#define EM_GENERATED_UNICODE_CLASSES_H", "",
             "#include <stdint.h>", ""]
    for name, ranges in (("LETTER", letters), ("NUMBER", numbers), ("WHITE_SPACE", WHITE_SPACE)):
        lines.append(f"static const uint32_t EM_UNICODE_{name}[][2] = {{")
        for i in range(0, len(ranges), 4):
            lines.append("  " + " ".join(f"{{0x{a:X}, 0x{b:X}}}," for a, b in ranges[i : i + 4]))
        lines.append("};")
        lines.append(f"#define EM_UNICODE_{name}_COUNT {len(ranges)}")
        lines.append("")
    lines += ["#endif", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(unicode_table_header())
