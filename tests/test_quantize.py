"""Group-wise quantization and the packed layout the kernels read."""
import numpy as np
import pytest

from edgemoe.compiler.quantize import quantize


@pytest.mark.parametrize("bits", [4, 8])
def test_round_trip_error_is_within_half_a_step(bits, rng):
    w = (rng.standard_normal((48, 128)) * 0.05).astype(np.float32)
    q = quantize(w, bits, 32)
    step = q.scales.astype(np.float32).repeat(32, axis=1)
    err = np.abs(q.dequantize() - w)
    assert np.all(err <= step / 2 + 1e-6 * np.abs(w).max())
    codes = q.codes()
    assert codes.min() >= -(1 << (bits - 1)) and codes.max() <= (1 << (bits - 1)) - 1


def test_int4_packing_layout():
    """Code k of a row sits in word k // 8 at bits 4 * (k % 8), offset by 8."""
    w = np.zeros((1, 32), np.float32)
    w[0, :8] = np.arange(-3, 5, dtype=np.float32)  # amax 4 → scale 4/7
    w[0, 8] = 4.0
    q = quantize(w, 4, 32)
    codes = q.codes()[0]
    word0 = int(q.packed[0, 0])
    for k in range(8):
        assert (word0 >> (4 * k)) & 0xF == codes[k] + 8
    assert codes[8] == 7 and (int(q.packed[0, 1]) & 0xF) == 15


def test_bad_shapes_and_bits_are_refused():
    with pytest.raises(ValueError, match="multiple of the group size"):
        quantize(np.zeros((4, 40), np.float32), 4, 32)
    with pytest.raises(ValueError, match="unsupported expert bitwidth 3"):
        quantize(np.zeros((4, 64), np.float32), 3, 32)
