"""Group-wise quantization and the packed layout the kernels read."""
import numpy as np
import pytest

from edgemoe.compiler.quantize import interleave, quantize


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
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


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
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


@pytest.mark.parametrize("layout", ["rows", "tiles"])
def test_int3_codes_are_two_bit_planes(layout):
    """INT3: the low two bits of each code packed as an INT2 matrix, then the high bit as an INT1
    matrix; rows: both planes interleaved over L = interleave(3) words (column t·L·p + j·L + i in
    word t·L + i at bit j·b); tiles: byte m, field j of word w holds column w·p + 4j + m."""
    rng = np.random.default_rng(3)
    k = 320
    w = rng.standard_normal((16, k)).astype(np.float32)
    q = quantize(w, 3, 32, layout)
    codes = q.codes()
    assert codes.min() == 0 and codes.max() == 7
    lanes = interleave(3, k, 32)
    assert lanes == 2  # 320 columns: blocks of L·32 must divide them
    for row in range(16):
        for col in range(k):
            low, high = 0, 0
            for b, first in ((2, 0), (1, k * 2 // 32)):
                per = 32 // b
                if layout == "rows":
                    t, rest = divmod(col, per * lanes)
                    j, i = divmod(rest, lanes)
                    v = (int(q.packed[row, first + t * lanes + i]) >> (b * j)) & ((1 << b) - 1)
                else:
                    word, within = divmod(col, per)
                    j, m = divmod(within, 4)
                    v = (int(q.packed[row // 16, first + word, row % 16]) >> (8 * m + b * j)) & ((1 << b) - 1)
                low, high = (v, high) if b == 2 else (low, v)
            assert low + 4 * high == codes[row, col]
    assert np.allclose(q.dequantize(), (codes - 3.5) * q.row_scales().astype(np.float32).repeat(32, axis=1))


def test_int2_levels_are_symmetric():
    w = np.array([[-1.5, -0.5, 0.5, 1.5] * 8], np.float32)
    q = quantize(w, 2, 32)
    assert np.array_equal(q.codes()[0, :4], [0, 1, 2, 3])
    assert np.allclose(q.dequantize(), w, rtol=1e-3)


def test_bad_shapes_and_bits_are_refused():
    with pytest.raises(ValueError, match="multiple of the group size"):
        quantize(np.zeros((4, 40), np.float32), 4, 32)
    with pytest.raises(ValueError, match="unsupported expert bitwidth 5"):
        quantize(np.zeros((4, 64), np.float32), 5, 32)
    with pytest.raises(ValueError, match="multiple of the group size 16 and of 32"):
        quantize(np.zeros((4, 48), np.float32), 3, 16)  # the high plane needs whole 32-column words
