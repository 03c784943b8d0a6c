"""Rounding a weight matrix to a bitwidth's levels: per group of `group` inputs one float16 scale,
per weight one level (an integer at 8 bits, a half-integer in [-c, c] below; quantize.py packs them).
INT4 also has the integer grid -8…7 (GGUF Q4_0's levels, quantize.GRIDS): the same searches, other levels.

Without calibration, each group's scale minimises the group's squared rounding error over a grid
of fractions of max|w|/c (max|w|/c itself included, so never worse than rounding to the largest
weight): at 2 bits clipping the few largest weights pays for itself many times over.

With calibration, the goal becomes the error of the matrix's outputs on calibration inputs X,
|(W - Q) Xᵀ|², through their Gram matrix H = XᵀX (compiler/profile.py gathers one per expert
matrix). Columns are rounded left to right and each column's rounding error is spread over the
columns not yet rounded, in proportion to how the inputs correlate (GPTQ: Frantar et al., "GPTQ:
Accurate Post-Training Quantization for Generative Pre-trained Transformers", ICLR 2023); a
group's scale is chosen when its first column is reached, weighting each input by its mean square.
Measured on the bundled model (docs/BENCHMARKS.md §5): WikiText-2 perplexity change with all experts
at INT2 +14.0% (max|w| scales) → +9.7% (scale search) → +3.7% (calibrated); INT4 +0.78% → −0.20%.
"""
from __future__ import annotations

import numba
import numpy as np
from scipy.linalg.lapack import dtrtri

# The grid of scale fractions searched per group (the last is max|w| / the highest level).
SCALE_FRACTIONS = np.linspace(0.3, 1.0, 29)
# Added to H's diagonal, as a fraction of its mean: keeps H invertible for inputs the calibration
# text never exercised, and limits how far errors are pushed onto weakly excited inputs.
DAMPING = 0.1


def level_range(bits: int, grid: str = "half") -> tuple[float, float, float]:
    """(lowest level, highest level, offset): a value x rounds to rint(x + offset) - offset, clipped.
    8 bits: the integers ±127; below, the half-integers ±c, c = (2^b - 1) / 2 (offset c), or on the
    "integer" grid -2^(b-1)…2^(b-1) - 1."""
    if bits == 8:
        return -127.0, 127.0, 0.0
    if grid == "integer":
        return -float(1 << (bits - 1)), float((1 << (bits - 1)) - 1), 0.0
    c = ((1 << bits) - 1) / 2.0
    return -c, c, c


def round_levels(x: np.ndarray, bits: int, grid: str = "half") -> np.ndarray:
    """x (weights divided by their scale) to the nearest level."""
    lo, hi, offset = level_range(bits, grid)
    return np.clip(np.rint(x + offset) - offset, lo, hi)


def search_scales(g: np.ndarray, bits: int, importance: np.ndarray | float = 1.0, grid: str = "half") -> np.ndarray:
    """Scales [..., 1] (float16 values, as float32) for groups g [..., group] minimising
    sum(importance · (g - level·s)²) over SCALE_FRACTIONS of max|g| / (the highest level)."""
    top = np.abs(g).max(axis=-1, keepdims=True) / level_range(bits, grid)[1]
    if np.isscalar(importance) and importance == 1 and g.dtype == np.float32 and g.shape[-1] <= PAIRWISE_BLOCK:
        return _search_fused(g, bits, grid, top)
    best = best_err = None
    for f in SCALE_FRACTIONS:
        s = (top * f).astype(np.float16).astype(np.float32)
        s = np.where(s > 0, s, np.float32(1))  # an all-zero group rounds to zeros at any scale
        err = (importance * (g - round_levels(g / s, bits, grid) * s) ** 2).sum(axis=-1, keepdims=True)
        if best is None:
            best, best_err = s, err
        else:
            better = err < best_err
            best, best_err = np.where(better, s, best), np.where(better, err, best_err)
    return best


# The unweighted search (every expert without calibration) as one compiled loop over each group's
# values, 4-5x faster than the array passes above and the same numbers: the same float32
# operations in the same order, the error summed as NumPy sums a row (pairwise: 8 accumulators,
# then a tree; rows longer than PAIRWISE_BLOCK, which NumPy splits further, take the path above).
PAIRWISE_BLOCK = 128


def _search_fused(g: np.ndarray, bits: int, grid: str, top: np.ndarray) -> np.ndarray:
    flat = np.ascontiguousarray(g.reshape(-1, g.shape[-1]))
    candidates = (top.reshape(-1, 1) * SCALE_FRACTIONS[None, :]).astype(np.float16).astype(np.float32)
    candidates = np.where(candidates > 0, candidates, np.float32(1))
    best = np.empty(flat.shape[0], np.float32)
    lo, hi, offset = level_range(bits, grid)
    _best_scales(flat, candidates, np.float32(lo), np.float32(hi), np.float32(offset), best)
    return best.reshape(*g.shape[:-1], 1)


@numba.njit(cache=True, nogil=True)
def _pairwise_sum(d, lo, n):
    """d[lo:lo + n].sum() as NumPy computes it for a contiguous float32 row of n <= PAIRWISE_BLOCK."""
    if n < 8:
        res = d[lo]
        for i in range(1, n):
            res += d[lo + i]
        return res
    r0, r1, r2, r3 = d[lo], d[lo + 1], d[lo + 2], d[lo + 3]
    r4, r5, r6, r7 = d[lo + 4], d[lo + 5], d[lo + 6], d[lo + 7]
    i = 8
    while i < n - n % 8:
        r0 += d[lo + i]
        r1 += d[lo + i + 1]
        r2 += d[lo + i + 2]
        r3 += d[lo + i + 3]
        r4 += d[lo + i + 4]
        r5 += d[lo + i + 5]
        r6 += d[lo + i + 6]
        r7 += d[lo + i + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += d[lo + i]
        i += 1
    return res


@numba.njit(cache=True, nogil=True)
def _best_scales(g, candidates, lo, hi, offset, best):
    """best[r] = the candidate scale of row r of g with the least squared rounding error (the first
    of equals); g float32 [rows, group], candidates float32 [rows, fractions]; levels as level_range."""
    n, size = g.shape
    d = np.empty(size, np.float32)
    for r in range(n):
        best_s, best_err = candidates[r, 0], np.float32(0)
        for f in range(candidates.shape[1]):
            s = candidates[r, f]
            for j in range(size):
                x = g[r, j] / s
                q = np.rint(x + offset) - offset
                e = g[r, j] - min(max(q, lo), hi) * s
                d[j] = e * e
            err = _pairwise_sum(d, 0, size)
            if f == 0 or err < best_err:
                best_s, best_err = s, err
        best[r] = best_s


def round_to_levels(w: np.ndarray, bits: int, group: int, gram: np.ndarray | None = None,
                    grid: str = "half") -> tuple[np.ndarray, np.ndarray]:
    """(scales float16 [N, K / group], levels float32 [N, K]) for w [N, K] ≈ levels · scales; with
    `gram` (float [K, K], the inputs' XᵀX) rounded to minimise the output error (module docstring)."""
    n, k = w.shape
    if gram is None or not np.trace(gram) > 0:
        g = w.astype(np.float32).reshape(n, k // group, group)
        s = search_scales(g, bits, grid=grid)
        return s[..., 0].astype(np.float16), (round_levels(g / s, bits, grid)).reshape(n, k).astype(np.float32)
    return _calibrated(w, bits, group, gram, grid)


# The last Gram matrix factored and its factors: an expert's gate and up matrices share their inputs,
# hence their Gram matrix, and factoring it is most of the cost of rounding them.
_last_factored: list = [None, None]


def _factor(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the diagonal of XᵀX, the upper Cholesky factor of the damped (XᵀX)⁻¹), for `gram` as given."""
    if _last_factored[0] is not gram:
        h = gram.astype(np.float64)
        importance = np.diag(h).copy()
        h = h + DAMPING * importance.mean() * np.eye(len(h))
        # Row j of the factor says how column j's error moves the columns after it. Without forming
        # H⁻¹: with J the order reversal and L the lower Cholesky factor of JHJ, H⁻¹ = (JL⁻¹J)ᵀ(JL⁻¹J)
        # and JL⁻¹J is upper triangular (a third of inverting H, then factoring H⁻¹).
        low = np.linalg.cholesky(np.ascontiguousarray(h[::-1, ::-1]))
        inverse, info = dtrtri(low, lower=1)
        if info:
            raise np.linalg.LinAlgError(f"the damped Gram matrix is singular (LAPACK dtrtri info {info})")
        _last_factored[:] = [gram, (importance, np.ascontiguousarray(inverse[::-1, ::-1]))]
    return _last_factored[1]


def _calibrated(w: np.ndarray, bits: int, group: int, gram: np.ndarray, grid: str) -> tuple[np.ndarray, np.ndarray]:
    n, k = w.shape
    importance, u = _factor(gram)
    rest = w.astype(np.float64).copy()
    scales = np.empty((n, k // group), np.float16)
    levels = np.empty((n, k), np.float32)
    for g0 in range(0, k, group):
        cols = slice(g0, g0 + group)
        block = rest[:, cols].copy()  # the group's columns, contiguous: a column of `rest` is strided by k
        s = search_scales(block[:, None, :], bits, importance[None, None, cols], grid)[:, 0, 0].astype(np.float64)
        scales[:, g0 // group] = s
        err = np.empty((n, group))
        within = u[cols, cols]
        for i in range(group):  # within the group column by column; past it, one matrix product
            q = round_levels(block[:, i] / s, bits, grid)
            levels[:, g0 + i] = q
            err[:, i] = (block[:, i] - q * s) / within[i, i]
            block[:, i + 1 :] -= np.outer(err[:, i], within[i, i + 1 :])
        rest[:, g0 + group :] -= err @ u[cols, g0 + group :]
    return scales, levels
