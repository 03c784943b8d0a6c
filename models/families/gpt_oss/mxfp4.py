"""MXFP4 (OCP Microscaling, FP4 E2M1 elements with an E8M0 scale per block of 32) as GPT-OSS
checkpoints store their experts: `<name>_blocks` uint8 [..., rows, cols/32, 16], two 4-bit codes
per byte (the lower nibble the even column), and `<name>_scales` uint8 [..., rows, cols/32], the
block's power of two biased by 127. Decoded exactly: every value is e2m1 · 2^(scale - 127), which
float32 holds without rounding (down to 2^-128 as a subnormal) unless it overflows, above scale
byte 252: such a value, and the scale byte 0xFF (E8M0's NaN), are refused."""
from __future__ import annotations

import numpy as np

from ...hf_import import ModelImportError

BLOCK = 32  # values per scale
# the 16 E2M1 codes: sign bit 3, exponent bits 2-1 (bias 1), mantissa bit 0
E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)


def decode(blocks: np.ndarray, scales: np.ndarray, name: str) -> np.ndarray:
    """float32 [..., rows, cols] of MXFP4 `blocks` [..., rows, cols/32, 16] and `scales` [..., rows, cols/32]."""
    if blocks.shape[-1] != BLOCK // 2 or blocks.shape[:-1] != scales.shape:
        raise ModelImportError(f"MXFP4 tensor {name!r}: blocks {blocks.shape} and scales {scales.shape} do not "
                               f"pair (blocks [..., rows, cols/{BLOCK}, {BLOCK // 2}], scales [..., rows, cols/{BLOCK}])")
    if (scales == 0xFF).any():
        raise ModelImportError(f"MXFP4 tensor {name!r} has the scale byte 0xFF (NaN in E8M0)")
    codes = np.empty((*blocks.shape[:-1], BLOCK), np.uint8)
    codes[..., 0::2] = blocks & 0x0F
    codes[..., 1::2] = blocks >> 4
    with np.errstate(over="ignore"):  # an overflow is refused below, by name
        values = np.ldexp(E2M1[codes], scales.astype(np.int32)[..., None] - 127).astype(np.float32)
    if not np.isfinite(values).all():
        raise ModelImportError(f"MXFP4 tensor {name!r} has values beyond float32's range (scale bytes above 252)")
    return values.reshape(*scales.shape[:-1], scales.shape[-1] * BLOCK)
