"""Group-wise quantization and the packed layout the kernels read."""
import numpy as np
import pytest

from edgemoe.compiler.quantize import quantize


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_round_trip_error_is_within_half_a_step(bits, rng):
    w = (rng.standard_normal((48, 128)) * 0.05).astype(np.float32)
    q = quantize(w, bits, 32)
    step = q.scales.astype(np.float32).repeat(32, axis=1)
    err = np.abs(q.dequantize() - w)
    assert np.all(err <= step / 2 + 1e-3 * np.abs(w).max())  # + float16 rounding of the scale
    codes = q.codes()
    lo, hi = (-127, 127) if bits == 8 else (0, (1 << bits) - 1)
    assert codes.min() >= lo and codes.max() <= hi
    assert np.abs(q.dequantize()).max() <= np.abs(w).max() * 1.001  # the extreme levels reach max|w|


def test_int4_packing_layout():
    """Code k of a row sits in word k // 8 at bits 4 * (k % 8); code u stands for (u - 7.5) * scale."""
    w = np.zeros((1, 32), np.float32)
    w[0, :8] = np.arange(-3, 5, dtype=np.float32)  # amax 4 → scale 4 / 7.5
    q = quantize(w, 4, 32)
    codes = q.codes()[0]
    word0 = int(q.packed[0, 0])
    for k in range(8):
        assert (word0 >> (4 * k)) & 0xF == codes[k]
    assert codes[7] == 15  # +4 is the top level
    assert np.isclose(q.dequantize()[0, 7], 4.0, rtol=1e-3)


def test_int2_levels_are_symmetric():
    w = np.array([[-1.5, -0.5, 0.5, 1.5] * 8], np.float32)
    q = quantize(w, 2, 32)
    assert np.array_equal(q.codes()[0, :4], [0, 1, 2, 3])
    assert np.allclose(q.dequantize(), w, rtol=1e-3)


def test_bad_shapes_and_bits_are_refused():
    with pytest.raises(ValueError, match="multiple of the group size"):
        quantize(np.zeros((4, 40), np.float32), 4, 32)
    with pytest.raises(ValueError, match="unsupported expert bitwidth 3"):
        quantize(np.zeros((4, 64), np.float32), 3, 32)
