"""llama.cpp's rounding of float weights into Q8_0 and Q4_0 blocks (ggml's reference quantizers), so a
float checkpoint compiles to the codes llama-quantize writes for it (``--rounding llamacpp``).

Per block of 32 weights, computed in float32 with the scale d unrounded and stored as float16:

* Q8_0: d = max|w| / 127, level = w·(1/d) rounded half away from zero, in −127…127;
* Q4_0: d = m / −8, m the weight of largest magnitude with its sign (the first such, so the
  extreme lands on level −8 exactly), level = min(15, trunc(w·(1/d) + 8.5)) − 8, in −8…7.

The searched scales of rounding.py give a lower error; this rule exists to reproduce what llama.cpp
makes of the same weights, so that a HF directory and its GGUF compile to the same artifact.

``LlamaCppRounded`` is a matrix as llama-quantize would store it: its ``stored_levels`` are those
blocks, so compiler/quantize.py repacks them wherever the bitwidth and grid hold them (Q8_0 at INT8,
Q4_0 at INT4 on the integer grid), exactly as it repacks a GGUF's, and ``read`` gives the values the
GGUF's dequantization gives. ``llamacpp_rounded`` wraps what an artifact quantizes: each routed
expert at its bits, the trunk's matrices at the trunk bits.
"""
from __future__ import annotations

import numpy as np

from ..models import Expert
from ..models.stored_tensor import LazyTensor
from .quantize import with_matrices

BLOCK = 32  # ggml's QK8_0 and QK4_0
# bits → (ggml type, lowest level, highest level)
BLOCK_TYPES = {8: ("Q8_0", -127, 127), 4: ("Q4_0", -8, 7)}


def check_bits(bits: int) -> None:
    if bits not in BLOCK_TYPES:
        raise ValueError(f"llama.cpp's rounding exists for INT8 (Q8_0) and INT4 (Q4_0), not for INT{bits}: use "
                         "another bitwidth or --rounding search")


def _half_away(x: np.ndarray) -> np.ndarray:
    """C's roundf: to the nearest integer, halves away from zero (x − trunc(x) is exact in float)."""
    t = np.trunc(x)
    return t + np.sign(x) * (np.abs(x - t) >= np.float32(0.5))


def round_blocks(w: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(levels int8 [..., K], float16 scales [..., K / 32]) of w [..., K] by llama.cpp's rule for `bits`
    (8: Q8_0, 4: Q4_0)."""
    check_bits(bits)
    if w.shape[-1] % BLOCK:
        raise ValueError(f"llama.cpp's blocks are {BLOCK} weights along a row; a row of {w.shape[-1]} is not whole "
                         "blocks")
    g = np.asarray(w, dtype=np.float32).reshape(-1, BLOCK)
    if bits == 8:
        d = np.abs(g).max(axis=1, keepdims=True) / np.float32(127)
    else:
        d = np.take_along_axis(g, np.abs(g).argmax(axis=1)[:, None], axis=1) / np.float32(-8)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    x = g * inv
    levels = _half_away(x) if bits == 8 else np.minimum(np.trunc(x + np.float32(8.5)), 15) - 8
    return (levels.astype(np.int8).reshape(w.shape),
            d.astype(np.float16).reshape(*w.shape[:-1], w.shape[-1] // BLOCK))


class LlamaCppRounded(LazyTensor):
    """`source` (an array or a LazyTensor [rows, K]) as llama-quantize stores it in `bits`' blocks,
    rounded when read (module docstring)."""

    def __init__(self, source, bits: int):
        check_bits(bits)
        self.source, self.bits, self.shape = source, bits, tuple(source.shape)

    def level_bounds(self, group: int) -> tuple[int, int] | None:
        return BLOCK_TYPES[self.bits][1:] if group == BLOCK else None

    def stored_bits(self) -> float:
        return self.bits + 16 / BLOCK  # the levels and a float16 d per block

    def stored_levels(self, group: int) -> tuple[np.ndarray, np.ndarray] | None:
        if group != BLOCK:
            return None
        return round_blocks(self.source.read() if isinstance(self.source, LazyTensor) else self.source, self.bits)

    def read(self) -> np.ndarray:
        levels, scales = self.stored_levels(BLOCK)
        w = levels.reshape(*self.shape[:-1], -1, BLOCK).astype(np.float32) * scales.astype(np.float32)[..., None]
        return w.reshape(self.shape)


def llamacpp_rounded(model, plan: list[list[int]], trunk_bits: int, group: int):
    """`model` with its routed experts (bits per [expert layer][expert]) and trunk matrices (at
    `trunk_bits`; 32 leaves them float) as llama-quantize rounds them; ValueError where it has no
    such rounding (another bitwidth, a group other than its blocks')."""
    if group != BLOCK:
        raise ValueError(f"llama.cpp's rounding makes groups of {BLOCK} weights; compile with --group {BLOCK}")
    for b in {b for row in plan for b in row} | ({trunk_bits} - {32}):
        check_bits(b)

    def expert(li, ei, e):
        b = plan[li][ei]
        return Expert(*(None if w is None else LlamaCppRounded(w, b) for w in (e.w_gate, e.w_up, e.w_down)))

    return with_matrices(model, expert, (lambda w: w) if trunk_bits == 32 else lambda w: LlamaCppRounded(w, trunk_bits))
