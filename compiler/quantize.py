"""Group-wise symmetric weight quantization and bit packing for expert and trunk matrices.

A weight matrix W [N, K] (rows = outputs) is split along K into groups of `group` values; each
group gets one float16 scale s and one integer code per weight:

* 8 bits: int8 codes q in [-127, 127], s = max|w| / 127, w ≈ q·s; stored as int8 [N, K]
  (packing them into words buys nothing and measured 3-5x slower to unpack).
* b < 8 bits: unsigned codes u in [0, 2^b - 1] around the centre c = (2^b - 1) / 2,
  s = max|w| / c, w ≈ (u - c)·s: all 2^b levels, symmetric (at 2 bits: ±0.5s, ±1.5s).
  Packed into uint32 words, p = 32/b codes per word, interleaved over L words (interleave()):
  a row is cut into blocks of L·p columns; column t·L·p + j·L + i sits in word t·L + i at bit j·b.
  One vector load of L words then yields, shift by shift, the codes of L consecutive columns, so
  the kernel's SIMD lanes multiply contiguous activations and never gather (measured in
  docs/BENCHMARKS.md against the plain order, column k in word k // p).

The TVM kernels read these layouts directly and dequantize in registers.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SUPPORTED_BITS = (2, 4, 8)
DEFAULT_GROUP = 32
# The trunk's matrices (attention projections, embedding / LM head) are stored at this many bits
# unless told otherwise; 32 keeps them float32. The router and norms always stay float32: they are
# tiny, and a routing flip changes which experts run.
TRUNK_BITS = (4, 8, 32)
DEFAULT_TRUNK_BITS = 8
MAX_INTERLEAVE = 16  # words: one 512-bit vector of uint32; narrower SIMD splits it into several loads


def interleave(bits: int, k: int, group: int) -> int:
    """Words per interleaved block for a row of k codes at `bits` < 8: the widest L <= 16 with
    L dividing the group (a block's L consecutive columns share one scale) and L·(32/bits)
    dividing k. At 8 bits (one int8 code per column, plain order) the same rule gives the
    kernel's vector width."""
    per = 1 if bits == 8 else 32 // bits
    lanes = MAX_INTERLEAVE
    while lanes > 1 and (group % lanes or k % (lanes * per)):
        lanes //= 2
    return lanes


def code_centre(bits: int) -> float:
    """The code that stands for zero: 0 for int8 codes, (2^b - 1) / 2 for unsigned b-bit codes."""
    return 0.0 if bits == 8 else ((1 << bits) - 1) / 2.0


def _max_level(bits: int) -> float:
    return 127.0 if bits == 8 else code_centre(bits)


@dataclass
class QuantizedMatrix:
    bits: int
    group: int
    packed: np.ndarray  # uint32 [N, K * bits / 32], or int8 [N, K] for 8 bits
    scales: np.ndarray  # float16 [N, K / group]

    @property
    def shape(self) -> tuple[int, int]:
        n = self.packed.shape[0]
        return n, self.packed.shape[1] * self.packed.dtype.itemsize * 8 // self.bits

    def codes(self) -> np.ndarray:
        """The stored integer codes [N, K] (signed at 8 bits, unsigned below)."""
        if self.bits == 8:
            return self.packed.astype(np.int32)
        n, k = self.shape
        per, lanes = 32 // self.bits, interleave(self.bits, k, self.group)
        shifts = (np.arange(per, dtype=np.uint32) * self.bits)[None, None, :, None]
        words = self.packed.reshape(n, k // (lanes * per), 1, lanes)  # [row, block, ., word]
        u = (words >> shifts) & np.uint32((1 << self.bits) - 1)  # [row, block, shift, word]
        return u.reshape(n, k).astype(np.int32)

    def dequantize(self) -> np.ndarray:
        n, k = self.shape
        s = self.scales.astype(np.float32).repeat(self.group, axis=1)
        return ((self.codes().astype(np.float32) - np.float32(code_centre(self.bits))) * s).reshape(n, k)

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales.nbytes


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported expert bitwidth {bits}; supported: {', '.join(map(str, SUPPORTED_BITS))}")


def quantize(w: np.ndarray, bits: int, group: int = DEFAULT_GROUP) -> QuantizedMatrix:
    check_bits(bits)
    n, k = w.shape
    if k % group or (k * bits) % 32:
        raise ValueError(f"input size {k} must be a multiple of the group size {group} and of {32 // bits}")
    g = w.astype(np.float32).reshape(n, k // group, group)
    scales = (np.abs(g).max(axis=2) / _max_level(bits)).astype(np.float16)
    s32 = scales.astype(np.float32)[:, :, None]  # round with the scale the kernel will see
    levels = g / np.where(s32 > 0, s32, 1.0)
    if bits == 8:
        q = np.clip(np.rint(levels), -127, 127).astype(np.int8).reshape(n, k)
        return QuantizedMatrix(bits, group, q, np.ascontiguousarray(scales))
    centre = code_centre(bits)
    u = np.clip(np.rint(levels + centre), 0, (1 << bits) - 1).astype(np.uint32).reshape(n, k)
    per, lanes = 32 // bits, interleave(bits, k, group)
    shifts = (np.arange(per, dtype=np.uint32) * bits)[None, None, :, None]
    blocks = u.reshape(n, k // (lanes * per), per, lanes) << shifts  # [row, block, shift, word]
    packed = np.bitwise_or.reduce(blocks, axis=2).reshape(n, k // per).astype(np.uint32)
    return QuantizedMatrix(bits, group, np.ascontiguousarray(packed), np.ascontiguousarray(scales))


def check_trunk_bits(bits: int) -> None:
    if bits not in TRUNK_BITS:
        raise ValueError(f"unsupported trunk bitwidth {bits}; supported: {', '.join(map(str, TRUNK_BITS))} "
                         "(32 = float32)")


def quantized_model(model, expert_bits, trunk_bits: int = DEFAULT_TRUNK_BITS, group: int = DEFAULT_GROUP):
    """A copy of `model` holding the dequantized values of what a compiled artifact stores, for the
    NumPy reference executor: experts at `expert_bits` (one bitwidth, or a plan of bits per
    [layer][expert]; None leaves them float) and the trunk matrices at `trunk_bits`."""
    from dataclasses import replace

    from ..models import Expert

    check_trunk_bits(trunk_bits)

    def q(w, b):
        return w if b == 32 else quantize(w, b, group).dequantize()

    def expert_plan(li, ei):
        if expert_bits is None:
            return 32
        return expert_bits if isinstance(expert_bits, int) else expert_bits[li][ei]

    layers = [
        replace(l, wq=q(l.wq, trunk_bits), wk=q(l.wk, trunk_bits), wv=q(l.wv, trunk_bits), wo=q(l.wo, trunk_bits),
                experts=[Expert(*(q(w, expert_plan(li, ei)) for w in (e.w_gate, e.w_up, e.w_down)))
                         for ei, e in enumerate(l.experts)])
        for li, l in enumerate(model.layers)
    ]
    embed = q(model.embed, trunk_bits)
    lm_head = embed if model.config.tie_embeddings else q(model.lm_head, trunk_bits)
    return replace(model, embed=embed, layers=layers, lm_head=lm_head)
