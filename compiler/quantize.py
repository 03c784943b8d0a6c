"""Group-wise symmetric weight quantization and bit packing for expert and trunk matrices.

A weight matrix W [N, K] (rows = outputs) is split along K into groups of `group` values; each
group gets one float16 scale s and one integer code per weight:

* 8 bits: int8 codes q in [-127, 127], w ≈ q·s; stored as int8 [N, K]
  (packing them into words buys nothing and measured 3-5x slower to unpack).
* b < 8 bits: unsigned codes u in [0, 2^b - 1] around the centre c = (2^b - 1) / 2,
  w ≈ (u - c)·s: all 2^b levels, symmetric (at 2 bits: ±0.5s, ±1.5s).

How s and the codes are chosen (a searched scale per group; with calibration, the rounding that
minimises the output error) is rounding.py's part; this module stores the result.
  Packed into uint32 words, p = 32/b codes per word, interleaved over L words (interleave()):
  a row is cut into blocks of L·p columns; column t·L·p + j·L + i sits in word t·L + i at bit j·b.
  One vector load of L words then yields, shift by shift, the codes of L consecutive columns, so
  the kernel's SIMD lanes multiply contiguous activations and never gather (measured in
  docs/BENCHMARKS.md against the plain order, column k in word k // p).

* INT4 on the "integer" grid (GRIDS): levels -8…7, centre c = 8: a GGUF's Q4_0 blocks, (q - 8)·d
  with q in [0, 15] and a float16 d per 32 weights, are exactly such a group, so they are repacked
  as they are (LazyTensor.stored_levels) instead of rounded a second time. One expert image holds
  its INT4 experts on one grid (its header says which), the kernels the centre of that grid.

* 3 bits: codes u in [0, 7] (centre 3.5) do not divide a word, so they are stored as two bit
  planes (planes()), each packed exactly as a matrix of its own width: the low two bits of every
  code as INT2 codes, then the high bit as INT1 codes, u = low + 4·high. The words of the low
  plane come first along a row (rows) or a tile (tiles), then those of the high plane; both
  planes of a rows-layout matrix use the one interleave of the narrower plane, so word i of a
  block holds column i in both. 3 bits per weight exactly, and a kernel reads both planes with
  the same vector loads as INT2 and INT1 would.

* 16 bits: the weights as float16 [N, K], no scales (no quantization beyond the cast).

That is the "rows" layout, read by the kernels that dequantize to float in registers. The
"tiles" layout is read by the integer-dot kernels (compiler/int_dot.py), which quantize the
activation to int8 and multiply it with the codes in int32 (AVX-512 VNNI `vpdpbusd`: unsigned
byte × signed byte, four products summed per 32-bit lane):

* codes are unsigned at every bitwidth, u = q + 128 at 8 bits, so one centre c applies;
* 16 rows form a tile; words are [N/16, K·b/32, 16]: word (t, w, i) holds row 16t + i, columns
  [w·p, (w+1)·p); byte m of the word holds, in its bit field j (b bits at bit j·b of the byte),
  column w·p + 4j + m. Masking field j of a vector of 16 words yields 16 rows × 4 consecutive
  columns as bytes, which is what one vpdpbusd consumes;
* scales are float16 [N/16, K/G, 16], so a tile's 16 scales of a group are one vector load.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .rounding import level_range, round_to_levels
from ..models.stored_tensor import LazyTensor, RowStack

SUPPORTED_BITS = (2, 3, 4, 8, 16)  # 16: float16 weights
DEFAULT_GROUP = 32
# The trunk's matrices (attention projections, embedding / LM head) are stored at this many bits
# unless told otherwise; 32 keeps them float32. The router and norms always stay float32: they are
# tiny, and a routing flip changes which experts run.
TRUNK_BITS = (4, 8, 32)
DEFAULT_TRUNK_BITS = 8
MAX_INTERLEAVE = 16  # words: one 512-bit vector of uint32; narrower SIMD splits it into several loads


def planes(bits: int) -> tuple[int, ...]:
    """The bit planes a `bits`-wide code is stored as, least significant first: (bits,) for every
    width that divides a word, (2, 1) for 3 bits."""
    return (2, 1) if bits == 3 else (bits,)


def interleave(bits: int, k: int, group: int) -> int:
    """Words per interleaved block for a row of k codes at `bits` < 8: the widest L <= 16 with
    L dividing the group (a block's L consecutive columns share one scale) and L·(32/b)
    dividing k, b the narrowest plane. At 8 bits (one int8 code per column, plain order) the
    same rule gives the kernel's vector width."""
    per = 1 if bits == 8 else 32 // min(planes(bits))
    lanes = MAX_INTERLEAVE
    while lanes > 1 and (group % lanes or k % (lanes * per)):
        lanes //= 2
    return lanes


LAYOUTS = ("rows", "tiles")
TILE_ROWS = 16


# The levels of INT4 codes: "half" the half-integers ±½…±7½, "integer" -8…7 (GGUF Q4_0's); the other
# bitwidths have one grid each (rounding.level_range).
GRIDS = ("half", "integer")


def check_grid(bits: int, grid: str) -> None:
    if grid not in GRIDS:
        raise ValueError(f"unknown INT4 grid {grid!r}; one of {', '.join(GRIDS)}")
    if grid != "half" and bits != 4:
        raise ValueError(f"the {grid} grid is one of INT4's, not of {bits}-bit codes")


def grid_at(bits: int, int4_grid: str) -> str:
    """The grid of `bits`-wide codes where INT4 ones are on `int4_grid` (the other widths have one)."""
    return int4_grid if bits == 4 else "half"


def code_centre(bits: int, layout: str = "rows", grid: str = "half") -> float:
    """The code that stands for zero: 0 for signed int8 codes (rows layout), 128 for unsigned ones
    (tiles layout), (2^b - 1) / 2 for unsigned b-bit codes on the half-integer grid, 2^(b-1) on the
    integer one."""
    if bits == 8:
        return 0.0 if layout == "rows" else 128.0
    return -level_range(bits, grid)[0]


def tiles_fit(n: int, k: int, bits: int, group: int) -> bool:
    """Whether an [n, k] matrix can be stored in the tiles layout: whole tiles of rows, and each
    group made of whole words of every plane."""
    return (bits <= 8 and n % TILE_ROWS == 0 and group % (32 // min(planes(bits))) == 0 and group % 4 == 0
            and k % group == 0)


@dataclass
class QuantizedMatrix:
    bits: int
    group: int
    packed: np.ndarray  # rows: uint32 [N, K * bits / 32], or int8 [N, K] for 8 bits; tiles: uint32 [N/16, K*bits/32, 16]
    scales: np.ndarray  # rows: float16 [N, K / group]; tiles: float16 [N/16, K / group, 16]
    layout: str = "rows"
    grid: str = "half"  # INT4's levels (GRIDS)

    @property
    def shape(self) -> tuple[int, int]:
        if self.layout == "tiles":
            return self.packed.shape[0] * TILE_ROWS, self.packed.shape[1] * 32 // self.bits
        if self.bits == 16:
            return self.packed.shape
        n = self.packed.shape[0]
        return n, self.packed.shape[1] * self.packed.dtype.itemsize * 8 // self.bits

    def codes(self) -> np.ndarray:
        """The stored integer codes [N, K] (signed at 8 bits in the rows layout, unsigned otherwise)."""
        n, k = self.shape
        if self.layout == "rows" and self.bits == 8:
            return self.packed.astype(np.int32)
        u, first, low = np.zeros((n, k), np.int32), 0, 0
        for b in planes(self.bits):
            words = k * b // 32
            if self.layout == "tiles":
                u += _unpack_tiles(self.packed[:, first : first + words], b) << low
            else:
                u += _unpack_rows(self.packed[:, first : first + words], b, interleave(self.bits, k, self.group)) << low
            first, low = first + words, low + b
        return u

    def row_scales(self) -> np.ndarray:
        """float16 [N, K / group] whatever the layout."""
        if self.layout == "tiles":
            return self.scales.transpose(0, 2, 1).reshape(-1, self.scales.shape[1])
        return self.scales

    def dequantize(self) -> np.ndarray:
        if self.bits == 16:
            return self.packed.astype(np.float32)
        n, k = self.shape
        s = self.row_scales().astype(np.float32).repeat(self.group, axis=1)
        centre = np.float32(code_centre(self.bits, self.layout, self.grid))
        return ((self.codes().astype(np.float32) - centre) * s).reshape(n, k)

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales.nbytes


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported expert bitwidth {bits}; supported: {', '.join(map(str, SUPPORTED_BITS))}")


def quantize(w, bits: int, group: int = DEFAULT_GROUP, layout: str = "rows", gram: np.ndarray | None = None,
             grid: str = "half") -> QuantizedMatrix:
    """w [N, K] (an array or a LazyTensor) at `bits` in `layout`; with `gram` (the inputs' XᵀX on
    calibration text) the rounding minimises the output error instead of the weight error
    (rounding.py). A LazyTensor stored as levels the bitwidth and grid hold (a GGUF's Q8_0 and Q4_0
    blocks, groups of `group`) is repacked unrounded: its values are the checkpoint's, and rounding
    them again against calibration text could only move them away."""
    check_bits(bits)
    check_grid(bits, grid)
    n, k = w.shape
    if bits == 16:
        if layout != "rows":
            raise ValueError("float16 weights are stored in the rows layout only")
        return QuantizedMatrix(16, group, np.ascontiguousarray(np.asarray(w), dtype=np.float16), np.zeros((n, 0), np.float16))
    per = 32 // min(planes(bits))
    if k % group or k % per:
        raise ValueError(f"input size {k} must be a multiple of the group size {group} and of {per}")
    if layout == "tiles" and not tiles_fit(n, k, bits, group):
        raise ValueError(f"a [{n}, {k}] matrix at {bits} bits, group {group}, does not fit the tiles layout "
                         f"(rows a multiple of {TILE_ROWS}, groups of whole words)")
    scales, levels = _levels(w, bits, group, gram, grid)
    return pack(levels, scales, bits, group, layout, grid)


def _levels(w, bits: int, group: int, gram: np.ndarray | None, grid: str) -> tuple[np.ndarray, np.ndarray]:
    """(scales, levels) of w: as stored where its levels are the bitwidth's, else rounded; a RowStack
    part by part (rows are quantized independently), as its parts are quantized alone."""
    if isinstance(w, RowStack) and gram is None:
        parts = [_levels(p, bits, group, None, grid) for p in w.parts]
        return np.concatenate([s for s, _ in parts]), np.concatenate([q for _, q in parts])
    stored = w.stored_levels(group) if isinstance(w, LazyTensor) else None
    lo, hi, offset = level_range(bits, grid)
    if stored is not None and offset == 0 and stored[0].min() >= lo and stored[0].max() <= hi:
        return stored[1], stored[0]
    return round_to_levels(w.read() if isinstance(w, LazyTensor) else w, bits, group, gram, grid)


def pack(levels: np.ndarray, scales: np.ndarray, bits: int, group: int, layout: str = "rows",
         grid: str = "half") -> QuantizedMatrix:
    """Levels [N, K] (of the bitwidth's grid, rounding.level_range) and float16 scales [N, K / group]
    as a QuantizedMatrix in `layout`."""
    n, k = levels.shape
    if layout == "tiles":
        scales = scales.reshape(n // TILE_ROWS, TILE_ROWS, -1).transpose(0, 2, 1)
    elif bits == 8:
        return QuantizedMatrix(bits, group, levels.astype(np.int8), np.ascontiguousarray(scales, dtype=np.float16))
    u = (levels + code_centre(bits, layout, grid)).astype(np.uint32)
    words, low = [], 0
    for b in planes(bits):
        plane = (u >> np.uint32(low)) & np.uint32((1 << b) - 1)
        words.append(_pack_tiles(plane, b) if layout == "tiles" else _pack_rows(plane, b, interleave(bits, k, group)))
        low += b
    return QuantizedMatrix(bits, group, np.ascontiguousarray(np.concatenate(words, axis=1)),
                           np.ascontiguousarray(scales, dtype=np.float16), layout, grid)


def _pack_rows(u: np.ndarray, bits: int, lanes: int) -> np.ndarray:
    """Unsigned b-bit codes [N, K] into the rows layout's words [N, K·b/32], interleaved over `lanes`."""
    n, k = u.shape
    per = 32 // bits
    shifts = (np.arange(per, dtype=np.uint32) * bits)[None, None, :, None]
    blocks = u.reshape(n, k // (lanes * per), per, lanes) << shifts  # [row, block, shift, word]
    return np.bitwise_or.reduce(blocks, axis=2).reshape(n, k // per).astype(np.uint32)


def _unpack_rows(words: np.ndarray, bits: int, lanes: int) -> np.ndarray:
    n, per = words.shape[0], 32 // bits
    shifts = (np.arange(per, dtype=np.uint32) * bits)[None, None, :, None]
    u = (words.reshape(n, -1, 1, lanes) >> shifts) & np.uint32((1 << bits) - 1)  # [row, block, shift, word]
    return u.reshape(n, -1).astype(np.int32)


def _pack_tiles(u: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned b-bit codes [N, K] into the tiles layout's words [N/16, K·b/32, 16]."""
    n, k = u.shape
    per, fields = 32 // bits, 8 // bits
    by_field = u.reshape(n, k // per, fields, 4)  # [row, word, field j, byte m]: column word·p + 4j + m
    shifts = np.arange(fields, dtype=np.uint32)[:, None] * bits + np.arange(4, dtype=np.uint32)[None] * 8
    words = np.bitwise_or.reduce((by_field << shifts).reshape(n, k // per, -1), axis=2).astype(np.uint32)
    return np.ascontiguousarray(words.reshape(n // TILE_ROWS, TILE_ROWS, k // per).transpose(0, 2, 1))


def _unpack_tiles(words: np.ndarray, bits: int) -> np.ndarray:
    fields = 8 // bits
    shifts = np.arange(fields, dtype=np.uint32)[:, None] * bits + np.arange(4, dtype=np.uint32)[None] * 8
    u = (words.transpose(0, 2, 1)[..., None, None] >> shifts) & np.uint32((1 << bits) - 1)  # [tile, row, word, field, byte]
    return u.reshape(words.shape[0] * TILE_ROWS, -1).astype(np.int32)


def check_trunk_bits(bits: int) -> None:
    if bits not in TRUNK_BITS:
        raise ValueError(f"unsupported trunk bitwidth {bits}; supported: {', '.join(map(str, TRUNK_BITS))} "
                         "(32 = float32)")


class RoundedTensor(LazyTensor):
    """A stored matrix as the artifact holds it (quantized at `bits`, dequantized), rounded when
    read rather than when made, so a model of stored tensors is rounded without holding it."""

    def __init__(self, source: LazyTensor, bits: int, group: int, gram: np.ndarray | None = None, grid: str = "half"):
        self.source, self.bits, self.group, self.gram, self.grid = source, bits, group, gram, grid
        self.shape = source.shape

    def read(self) -> np.ndarray:
        return quantize(self.source, self.bits, self.group, gram=self.gram, grid=self.grid).dequantize()


def with_matrices(model, expert, trunk):
    """`model` with each routed expert replaced by expert(expert layer, index, Expert) and each matrix
    an artifact stores at the trunk bitwidth (trunk_file.QUANTIZED: attention projections, embeddings,
    LM head, shared experts and dense MLPs) by trunk(matrix); absent ones stay None, tied embeddings
    tied. MLA's wkv_b, routers and norms are left as they are."""
    from dataclasses import replace

    from ..models import Expert

    def t(w):
        return None if w is None else trunk(w)

    def resident(e):
        return None if e is None else Expert(*(t(w) for w in (e.w_gate, e.w_up, e.w_down)))

    moe_index = {l: m for m, l in enumerate(model.config.moe_layer_ids)}
    layers = [
        replace(l, wq=t(l.wq), wk=t(l.wk), wv=t(l.wv), wo=t(l.wo), wq_a=t(l.wq_a), wkv_a=t(l.wkv_a),
                experts=[expert(moe_index[li], ei, e) for ei, e in enumerate(l.experts)],
                shared=resident(l.shared), dense=resident(l.dense), cwq=t(l.cwq), cwk=t(l.cwk), cwv=t(l.cwv),
                cwo=t(l.cwo))
        for li, l in enumerate(model.layers)
    ]
    embed = t(model.embed)
    return replace(model, embed=embed, layers=layers, encoder_embed=t(model.encoder_embed),
                   lm_head=embed if model.config.tie_embeddings else t(model.lm_head))


def quantized_model(model, expert_bits, trunk_bits: int = DEFAULT_TRUNK_BITS, group: int = DEFAULT_GROUP,
                    layout: str = "rows", moments=None, int4_grid: str = "half"):
    """A copy of `model` holding the dequantized values of what a compiled artifact stores, for the
    NumPy reference executor: experts at `expert_bits` (one bitwidth, or a plan of bits per
    [expert layer][expert]; None leaves them float; INT4 ones on `int4_grid`), rounded against
    `moments` (profile.ExpertMoments) when given, and the trunk matrices at `trunk_bits` (INT4 on
    `int4_grid` too). With the tiles layout the artifact's kernels also quantize their inputs, and so
    does the reference."""
    from dataclasses import replace

    from ..models import Expert

    check_trunk_bits(trunk_bits)

    def q(w, b, gram=None, grid="half"):
        if b == 32 or w is None:
            return w
        if isinstance(w, LazyTensor):  # a streaming compile's: rounded when read, one layer at a time
            return RoundedTensor(w, b, group, gram, grid)
        return quantize(w, b, group, gram=gram, grid=grid).dequantize()

    def expert(li, ei, e):
        if expert_bits is None:
            return e
        b = expert_bits if isinstance(expert_bits, int) else expert_bits[li][ei]
        grams = moments.grams(li, ei) if moments is not None else (None,) * 3
        return Expert(*(q(w, b, g, grid_at(b, int4_grid)) for w, g in zip((e.w_gate, e.w_up, e.w_down), grams)))

    trunk_grid = grid_at(trunk_bits, int4_grid)
    tiles = layout == "tiles"
    return replace(with_matrices(model, expert, lambda w: q(w, trunk_bits, grid=trunk_grid)),
                   trunk_act_group=group if tiles and trunk_bits != 32 else None,
                   expert_act_group=group if tiles and expert_bits is not None else None)


def compiled_trunk(model, trunk_bits: int = DEFAULT_TRUNK_BITS, group: int = DEFAULT_GROUP, layout: str = "rows",
                   int4_grid: str = "half"):
    """The model as an artifact computes it, experts still float: trunk matrices at `trunk_bits` (INT4 on
    `int4_grid`) and, with the tiles layout, every quantized matmul's input rounded as the integer-dot
    kernels round it."""
    from dataclasses import replace

    return replace(quantized_model(model, None, trunk_bits, group, layout, int4_grid=int4_grid),
                   expert_act_group=group if layout == "tiles" else None)
