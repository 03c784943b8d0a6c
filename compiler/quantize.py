"""Group-wise symmetric weight quantization and bit packing for expert matrices.

A weight matrix W [N, K] (rows = outputs) is split along K into groups of `group` values; each
group gets one float16 scale = max|w| / (2^(b-1) - 1) and integer codes q in [-2^(b-1), 2^(b-1)-1].
Below 8 bits, codes are stored offset by 2^(b-1) (unsigned) and packed little-endian into uint32
words, 32/b codes per word: code k of a row sits in word k // (32/b) at bit (k % (32/b)) * b.
8-bit codes are plain int8 [N, K] (packing them buys nothing and measured 3-5x slower to unpack).
The TVM kernels read these layouts directly and dequantize in registers.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SUPPORTED_BITS = (4, 8)
DEFAULT_GROUP = 32


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
        """Signed integer codes [N, K]."""
        if self.bits == 8:
            return self.packed.astype(np.int32)
        per = 32 // self.bits
        shifts = (np.arange(per, dtype=np.uint32) * self.bits)[None, None, :]
        mask = np.uint32((1 << self.bits) - 1)
        u = (self.packed[:, :, None] >> shifts) & mask
        return u.reshape(self.packed.shape[0], -1).astype(np.int32) - (1 << (self.bits - 1))

    def dequantize(self) -> np.ndarray:
        n, k = self.shape
        s = self.scales.astype(np.float32).repeat(self.group, axis=1)
        return (self.codes().astype(np.float32) * s).reshape(n, k)


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported expert bitwidth {bits}; supported: {', '.join(map(str, SUPPORTED_BITS))}")


def quantize(w: np.ndarray, bits: int, group: int = DEFAULT_GROUP) -> QuantizedMatrix:
    check_bits(bits)
    n, k = w.shape
    if k % group or (k * bits) % 32:
        raise ValueError(f"input size {k} must be a multiple of the group size {group} and of {32 // bits}")
    qmax = (1 << (bits - 1)) - 1
    g = w.astype(np.float32).reshape(n, k // group, group)
    amax = np.abs(g).max(axis=2)
    scales = (amax / qmax).astype(np.float16)
    s32 = scales.astype(np.float32)[:, :, None]  # round with the scale the kernel will see
    q = np.clip(np.rint(g / np.where(s32 > 0, s32, 1.0)), -qmax - 1, qmax).astype(np.int32).reshape(n, k)
    if bits == 8:
        return QuantizedMatrix(bits, group, q.astype(np.int8), np.ascontiguousarray(scales))
    u = (q + (1 << (bits - 1))).astype(np.uint32)
    per = 32 // bits
    shifts = (np.arange(per, dtype=np.uint32) * bits)[None, None, :]
    packed = np.bitwise_or.reduce(u.reshape(n, k // per, per) << shifts, axis=2).astype(np.uint32)
    return QuantizedMatrix(bits, group, np.ascontiguousarray(packed), np.ascontiguousarray(scales))


def with_quantized_experts(model, bits: int, group: int = DEFAULT_GROUP):
    """A copy of `model` whose experts hold the dequantized values of their `bits` quantization:
    the float model the compiled artifact computes, for the NumPy reference executor."""
    from dataclasses import replace

    from ..models import Expert

    def q(w):
        return quantize(w, bits, group).dequantize()

    layers = [replace(l, experts=[Expert(q(e.w_gate), q(e.w_up), q(e.w_down)) for e in l.experts]) for l in model.layers]
    return replace(model, layers=layers)
