"""Group-wise quantization and the packed layout the kernels read."""
import numpy as np
import pytest

from edgemoe.compiler.quantize import interleave, quantize


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_round_trip_rounds_to_the_nearest_level_within_the_clip(bits, rng):
    w = (rng.standard_normal((48, 128)) * 0.05).astype(np.float32)
    q = quantize(w, bits, 32)
    step = q.scales.astype(np.float32).repeat(32, axis=1)
    top = step * (127 if bits == 8 else ((1 << bits) - 1) / 2)  # the largest level of each group
    err = np.abs(q.dequantize() - w)
    inside = np.abs(w) <= top
    assert np.all(err[inside] <= step[inside] / 2 * (1 + 1e-5))
    assert np.allclose(err[~inside], np.abs(w[~inside]) - top[~inside], rtol=1e-5)  # clipped to the top level
    codes = q.codes()
    lo, hi = (-127, 127) if bits == 8 else (0, (1 << bits) - 1)
    assert codes.min() >= lo and codes.max() <= hi


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_searched_scales_never_lose_to_the_max_scale(bits, rng):
    """Each group's squared error is at most that of s = max|w| / top level (computed here
    independently); at 2 bits clipping the largest weights cuts the error substantially."""
    w = (rng.standard_normal((64, 256)) * 0.05).astype(np.float32)
    c = 127 if bits == 8 else ((1 << bits) - 1) / 2
    g = w.reshape(64, 8, 32)
    s = (np.abs(g).max(axis=2, keepdims=True) / c).astype(np.float16).astype(np.float32)
    levels = np.clip(np.rint(g / s + (0 if bits == 8 else c)) - (0 if bits == 8 else c), -c, c)
    err_max = ((levels * s - g) ** 2).sum(axis=2)
    err = ((quantize(w, bits, 32).dequantize().reshape(64, 8, 32) - g) ** 2).sum(axis=2)
    assert np.all(err <= err_max * (1 + 1e-6))
    if bits == 2:
        assert err.sum() < 0.8 * err_max.sum()


@pytest.mark.parametrize("k,lanes", [(128, 16), (320, 8), (96, 4)])
def test_int4_packing_is_interleaved(k, lanes):
    """Column t·8L + j·L + i sits in word t·L + i at bits 4j (L words interleaved); code u stands
    for (u - 7.5) * scale."""
    rng = np.random.default_rng(k)
    w = rng.standard_normal((2, k)).astype(np.float32)
    w[1, 5] = 4 * np.abs(w[1, :32]).max()  # the top level of its group
    q = quantize(w, 4, 32)
    assert interleave(4, k, 32) == lanes
    codes = q.codes()
    for row in range(2):
        for col in range(k):
            t, rest = divmod(col, 8 * lanes)
            j, i = divmod(rest, lanes)
            assert (int(q.packed[row, t * lanes + i]) >> (4 * j)) & 0xF == codes[row, col]
    assert codes[1, 5] == 15
    assert np.isclose(q.dequantize()[1, 5], 7.5 * float(q.scales[1, 0]), rtol=1e-6)


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
