"""Integer-dot kernels: int8 activations × packed weight codes, int32 accumulation.

The float kernels of kernels.py dequantize every weight to float32 (shift, mask, convert, centre,
scale) before an FMA, and are bound by those instructions rather than by memory. These kernels
instead quantize the input vector once per call to int8, one scale per group of G inputs
(s_x = max|x| / 127), and multiply it with the weights' codes in integer arithmetic:

    y[r] = Σ_g s_w[r, g] · s_x[g] · (Σ_{k ∈ g} u[r, k] · q[k]  −  c · Σ_{k ∈ g} q[k])

where u are the unsigned codes and c their centre (quantize.py's tiles layout). The inner sum is
AVX-512 VNNI's `vpdpbusd` (64 byte products, summed four at a time into 16 int32 lanes): for a
tile of 16 rows it takes one vector of words per 4, 8 or 16 columns (INT8/4/2), masked to bytes
(INT3: a vector of each plane's words, the high plane's bit shifted above the low plane's two).
c · Σ q depends on the group alone, so it is computed once per call, not per row. On Arm
(`dotprod`: Cortex-A76/A78/X1 and later) the instruction is `sdot`, signed × signed over 4 int32
lanes: a tile is done as four vectors of 4 rows, and 8-bit codes are flipped to signed bytes
(u XOR 0x80 = u − 128) so their centre becomes 0; 2- and 4-bit codes are small enough as they are.
Armv8.0 cores without dotprod (Cortex-A53/A72) get the same sums from widening multiplies
(`smull` to int16, `saddlp` and `addp` to int32), as llama.cpp's kernels do there; x86 without
VNNI from `pmaddubsw` and `pmaddwd` (8-bit codes: on |x| and the codes carrying x's sign). On the Cortex-M55
(Helium/MVE, 4 int32 lanes) each byte of a lane's word is sign-extended in place by two shifts and
multiplied-accumulated: about half the vector operations per weight of the float kernels (decode,
convert, centre, scale, FMA); on a Cortex-M7 (DSP extension, no vector unit) each lane is a core
register: SXTB16 spreads even and odd bytes into int16 halves and two SMLADs add the four products.
Instructions per token on both: docs/BENCHMARKS.md §8.

The kernels are written directly in TIR (TVMScript) rather than as tensor expressions to be
scheduled: the vector types, the accumulation chains and the intrinsic are the schedule, and its
choices are the knobs of `Knobs` (the hand schedule is `Knobs()`), which tuning.py searches per
kernel shape on the machine that runs it. Each call quantizes its own input into a small
workspace, so the C runtime calls them exactly like the float kernels (same arguments, float32
input and output).
"""
from __future__ import annotations

import functools
import inspect
import json
import sys
import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace

import tvm
from tvm import tirx
from tvm.script import tirx as T
from tvm.script.parser.core import parser as _tvmscript_parser
from tvm.tirx.script.parser import entry as _tvmscript_entry

from ..models import MoEConfig
from .quantize import TILE_ROWS, code_centre, planes



# Kernels reading at least this many weight bytes split their tiles over the compute threads. These
# kernels run at memory speed on one core (~30 GB/s here), so below ~2 MiB (~60 µs) waking a second
# thread costs more than it saves: with the float kernels' 256 KiB the bundled model decoded at 4618
# tok/s on 2 threads against 5384 on 1 (its 1 MiB LM head was the only kernel split). That is the hand
# schedule's rule; a tuning record's `parallel` knob decides for its kernel shape instead.
PARALLEL_MIN_BYTES = 2 << 20
MEMOIZED_KERNELS = 512  # kernels a process keeps built (_memoized), a few KiB of TIR each
KNOBS_ATTR = "edgemoe.int_dot_knobs"  # the PrimFunc attribute holding an integer-dot kernel's knobs (JSON)


@dataclass(frozen=True)
class Knobs:
    """The schedule choices of an integer-dot kernel; the defaults are the hand schedule."""

    chains: int = 2  # independent accumulation chains in a group's dot product (latency hiding)
    tiles: int = 1  # tiles of TILE_ROWS rows one step of the row loop works on, side by side in its group loop
    # vectors of `lanes` rows of a tile per group step (others: further passes over the groups); None: the
    # ISA's hand choice (Isa.hand_vectors)
    vectors: int | None = None
    unroll: int = 1  # groups per iteration of the group loop, unrolled
    fuse: bool = False  # gate_up: the gate's and the up's tiles in one group loop (else one loop after the other)
    # software prefetch of the weights this many groups ahead (0: the hardware's alone); None: the ISA's
    # hand choice (Isa.hand_prefetch)
    prefetch: int | None = None
    parallel: bool | None = None  # row loop split over the compute threads; None: from PARALLEL_MIN_BYTES

    def resolved(self, isa: "Isa", rows: int, k: int, bits: int, group: int, matrices: int = 1) -> "Knobs":
        """These knobs for a kernel of `matrices` [rows, k] matrices at `bits`, `parallel` decided from
        their bytes, `vectors` and `prefetch` from the ISA where None; ValueError if they do not fit it."""
        if self.vectors is None or self.prefetch is None:
            hand = replace(self, vectors=isa.hand_vectors if self.vectors is None else self.vectors,
                           prefetch=isa.hand_prefetch if self.prefetch is None else self.prefetch)
            return hand.resolved(isa, rows, k, bits, group, matrices)
        misfits = [what for what, bad in (
            (f"{self.tiles} tiles per step for {rows // TILE_ROWS} tiles",
             self.tiles < 1 or rows // TILE_ROWS % self.tiles),
            (f"{self.unroll} groups per step for {k // group} groups", self.unroll < 1 or k // group % self.unroll),
            (f"{self.vectors} vectors of {isa.lanes} rows per step for tiles of {TILE_ROWS}",
             self.vectors < 1 or TILE_ROWS // isa.lanes % self.vectors),
            (f"{self.chains} accumulation chains for {group // 4} steps per group", not 1 <= self.chains <= group // 4),
            ("a negative prefetch distance", self.prefetch < 0),
            ("fusing matrices in a one-matrix kernel", self.fuse and matrices < 2)) if bad]
        if misfits:
            raise ValueError(f"knobs {self} do not fit this kernel: {'; '.join(misfits)}")
        weight_bytes = matrices * rows * k * bits // 8
        return self if self.parallel is not None else replace(self, parallel=weight_bytes >= PARALLEL_MIN_BYTES)


@dataclass(frozen=True)
class Isa:
    """An int8 dot product of 4-byte groups: acc[lane] += Σ_{m<4} a[4·lane + m] · b[4·lane + m]:
    one instruction (`intrinsic`), or, on Arm without dotprod, widening multiplies (intrinsic None)."""

    name: str
    arch: str  # the target triple's architecture
    feature: str  # LLVM target feature that provides it
    lanes: int  # int32 lanes per vector
    intrinsic: str | None
    signed_codes: bool  # the weight operand is signed (8-bit codes are flipped to u − 128)
    # the hand schedule's vectors per group step: AVX2 takes a whole tile (its two 8-row vectors), each
    # 64-byte line of the tile's words read once, not in two passes (tuning chose it in every AVX2
    # kernel, docs/BENCHMARKS.md §1); elsewhere one (MVE has 8 vector registers)
    hand_vectors: int = 1
    # the hand schedule's software prefetch distance in groups: AVX2 16 (whole-model decode of the 1.88 B
    # OLMoE-shaped model, 2026-11-30: 0 → 16 about +10% at 1 and 2 threads, 8 between, 32 alike);
    # VNNI 0 (8 was slower there)
    hand_prefetch: int = 0


ISAS = (
    Isa("AVX-512 VNNI", "x86_64", "avx512vnni", 16, "llvm.x86.avx512.vpdpbusd.512", False),  # u8 weights × s8 inputs
    Isa("Arm dotprod", "aarch64", "dotprod", 4, "llvm.aarch64.neon.sdot.v4i32.v16i8", True),  # s8 × s8
    # Armv8.0 (Cortex-A53/A72): smull s8 × s8 → s16, pairwise widening adds; the same sums, six instructions
    Isa("Arm NEON", "aarch64", "neon", 4, None, True),
    # x86 without VNNI (Haswell and later): u8 × s8 pairs → s16 (pmaddubsw), pairs → s32 (pmaddwd); the
    # 2-4-bit codes are the unsigned operand as they are, 8-bit ones (flipped to signed) go as |x| ·
    # (code with x's sign) (no saturation as |x|, |code| ≤ 127)
    Isa("AVX2", "x86_64", "avx2", 8, None, True, hand_vectors=2, hand_prefetch=16),
    # Cortex-M55 (Helium): per int32 lane, each byte sign-extended in place by two shifts and
    # multiplied-accumulated (VSHL, VSHR, VMLA on 4 lanes); the input's bytes are shared by the lanes
    Isa("Arm MVE", "arm", "mve", 4, None, True),
    # Cortex-M7 (DSP extension, no vector unit): per lane, SXTB16 spreads the even and the odd bytes
    # of the codes and of the input into int16 halves, and two SMLADs add their four products
    Isa("Arm DSP", "arm", "dsp", 4, "llvm.arm.smlad", True),
)


def isa_for(target: tvm.target.Target) -> Isa | None:
    """The first (fastest) int8 dot product `target` has, if any."""
    from tvm.target import codegen

    from .cpu_features import target_arch

    arch = target_arch(target)
    for isa in ISAS:
        if arch == isa.arch and codegen.target_has_features(isa.feature, target):
            return isa
    return None


def supported(target: tvm.target.Target) -> bool:
    return isa_for(target) is not None


def _vec(value, dtype: str, lanes: int):
    return tirx.Broadcast(tirx.const(value, dtype), lanes)


def centre(isa: Isa, bits: int, grid: str = "half") -> float:
    """The code for zero as the instruction sees it (after the flip of 8-bit codes to signed); INT4
    codes on `grid` (quantize.GRIDS)."""
    return 0.0 if bits == 8 and isa.signed_codes else code_centre(bits, "tiles", grid)


PAIRS_PER_WIDEN = 8  # 8 · 3810 = 30480 fits int16 (see _group_dot)


class _Lanes(list):
    """An accumulator held as one int32 scalar per lane (the Cortex-M7's SMLAD works on scalars)."""


def _group_dot(isa: Isa, W, X4, x0, t, g, sub, bits: int, group: int, k: int, chains: int):
    """int32 × lanes: Σ over the columns of group g of code · q (q: X4 from word x0 on), for rows
    sub·lanes … of tile t.
    Each step takes 4 consecutive columns: one byte of each lane's word, masked out of its bit
    field (for INT3, the low plane's field with the high plane's bit above it). `chains`
    independent accumulation chains (steps dealt round-robin) keep the instruction's latency off
    the critical path."""
    lanes = isa.lanes
    acc: list = [_vec(0, "int32", lanes) for _ in range(chains)]
    words: dict = {}
    # AVX2, 2-4-bit codes: pmaddubsw's int16 pair sums (each at most 2 · 15 · 127 = 3810 in magnitude) are
    # added in int16, PAIRS_PER_WIDEN quads of a chain at a time, before one pmaddwd widens them to int32:
    # one instruction fewer per quad, the very same sums
    pairs16 = isa.intrinsic is None and isa.arch == "x86_64" and bits < 8
    pending: list = [None] * chains
    taken = [0] * chains

    def widen(c):  # chain c's int16 pair sums into its int32 accumulator
        acc[c] = acc[c] + tirx.call_llvm_pure_intrin("int32x8", "llvm.x86.avx2.pmadd.wd", pending[c],
                                                     _vec(1, "int16", 16))
        pending[c], taken[c] = None, 0

    def word(first, b, index):  # word `index` of group g in the b-bit plane starting at word `first`
        if (first, index) not in words:
            words[first, index] = W.vload([t, first + g * (group * b // 32) + index, sub * lanes], f"uint32x{lanes}")
        return words[first, index]

    for quad in range(group // 4):
        col = 4 * quad  # within the group
        codes, first, low = None, 0, 0
        for b in planes(bits):
            per = 32 // b
            w = word(first, b, col // per)
            if b == 8:
                field = w ^ _vec(0x80808080, "uint32", lanes) if isa.signed_codes else w
            else:
                mask = _vec(((1 << b) - 1) * 0x01010101, "uint32", lanes)
                field = (w >> _vec(col % per // 4 * b, "uint32", lanes)) & mask
            if low:
                field = field << _vec(low, "uint32", lanes)
            codes = field if codes is None else codes | field
            first, low = first + k * b // 32, low + b
        # the 4 input codes of these columns, as one int32, to every lane
        act, c = tirx.Broadcast(X4[x0 + g * (group // 4) + quad], lanes), quad % chains
        if pairs16:
            pairs = tirx.call_llvm_pure_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", tirx.reinterpret("int8x32", codes),
                                               tirx.reinterpret("int8x32", act))
            pending[c], taken[c] = pairs if pending[c] is None else pending[c] + pairs, taken[c] + 1
            if taken[c] == PAIRS_PER_WIDEN:
                widen(c)
        else:
            acc[c] = _dot4(isa, acc[c], codes, act)
    for c in range(chains):
        if pending[c] is not None:
            widen(c)
    acc = [tirx.Shuffle(list(a), list(range(lanes))) if isinstance(a, _Lanes) else a for a in acc]
    while len(acc) > 1:  # summed pairwise
        acc = [acc[i] + acc[i + 1] if i + 1 < len(acc) else acc[i] for i in range(0, len(acc), 2)]
    return acc[0]


def _dot4(isa: Isa, acc, codes, act):
    """acc + (per int32 lane: the sum of its 4 byte products), codes and act as uint32/int32 vectors (on
    AVX2, 8-bit codes: _group_dot takes the smaller ones itself)."""
    lanes = isa.lanes
    if isa.intrinsic is None and isa.arch == "x86_64":  # 8-bit codes, flipped to signed: |x| · code·sign(x)
        c, x = tirx.reinterpret("int8x32", codes), tirx.reinterpret("int8x32", act)
        magnitude = tirx.call_llvm_pure_intrin("int8x32", "llvm.x86.avx2.psign.b", x, x)  # |x|
        signed = tirx.call_llvm_pure_intrin("int8x32", "llvm.x86.avx2.psign.b", c, x)  # code · sign(x)
        pairs = tirx.call_llvm_pure_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", magnitude, signed)
        return acc + tirx.call_llvm_pure_intrin("int32x8", "llvm.x86.avx2.pmadd.wd", pairs, _vec(1, "int16", 16))
    if isa.intrinsic is None and isa.arch == "arm":
        c, x = tirx.reinterpret(f"int32x{lanes}", codes), tirx.reinterpret(f"int32x{lanes}", act)
        for m in range(4):  # byte m of each word, sign-extended: (w << 24 - 8m) >> 24, arithmetic
            up = _vec(24 - 8 * m, "int32", lanes)
            acc = acc + ((c << up) >> _vec(24, "int32", lanes)) * ((x << up) >> _vec(24, "int32", lanes))
        return acc
    if isa.intrinsic == "llvm.arm.smlad":
        def halves(word):  # (even bytes, odd bytes), each as two sign-extended int16 halves
            rotated = (word >> tirx.const(8, "uint32")) | (word << tirx.const(24, "uint32"))
            return [tirx.call_llvm_pure_intrin("int32", "llvm.arm.sxtb16", tirx.reinterpret("int32", w))
                    for w in (word, rotated)]

        a = halves(tirx.Shuffle([act], [0]))  # the input's 4 bytes, the same in every lane
        sums = _Lanes()
        for i in range(lanes):
            # lane i's chain goes on from lane i's own scalar: taking it out of a vector of the lanes
            # would copy every lane's expression into each lane, step after step (4^steps: these
            # kernels' TIR was ~100x the other ISAs' and took ~40 s to lower)
            total = acc[i] if isinstance(acc, _Lanes) else tirx.Shuffle([acc], [i])
            c = halves(tirx.Shuffle([codes], [i]))
            for h in range(2):
                total = tirx.call_llvm_pure_intrin("int32", isa.intrinsic, c[h], a[h], total)
            sums.append(total)
        return sums
    if isa.intrinsic is not None:
        return tirx.call_llvm_pure_intrin(f"int32x{lanes}", isa.intrinsic, acc, tirx.reinterpret(f"int8x{4 * lanes}", codes),
                                          tirx.reinterpret(f"int8x{4 * lanes}", act))
    # NEON without dotprod (4 lanes): bytes of lanes 0-1 and 2-3 multiplied to int16 (smull), pairs
    # summed to int32 (saddlp), then adjacent pairs of those (addp): lane i = Σ of its 4 products.
    halves = []
    for h in range(2):
        c = tirx.reinterpret("int8x8", tirx.Shuffle([codes], [2 * h, 2 * h + 1]))
        x = tirx.reinterpret("int8x8", tirx.Shuffle([act], [2 * h, 2 * h + 1]))
        prod = tirx.call_llvm_pure_intrin("int16x8", "llvm.aarch64.neon.smull.v8i16", c, x)
        halves.append(tirx.call_llvm_pure_intrin("int32x4", "llvm.aarch64.neon.saddlp.v4i32.v8i16", prod))
    return acc + tirx.call_llvm_pure_intrin("int32x4", "llvm.aarch64.neon.addp.v4i32", halves[0], halves[1])


def _quantize_input(k: int, group: int, centre: float):
    """A macro: row m of x (float32, rows of k) → its q (int8, also seen 4 per int32), s_x, and c · Σ q
    per group, into row m of xq, xs and xc."""
    ng = k // group

    @T.macro
    def body(x, xq, xs, xc, m):
        for g in range(ng):
            amax = T.decl_buffer((1,), "float32", scope="local")
            total = T.decl_buffer((1,), "int32", scope="local")
            amax[0] = T.float32(0)
            for i in range(group):
                amax[0] = T.max(amax[0], T.fabs(x[m * k + g * group + i]))
            xs[m * ng + g] = amax[0] / T.float32(127)
            total[0] = 0
            for i in range(group):
                # one product, rounded half to even: nothing for the compiler to contract into an FMA,
                # so models/reference.py quantize_activation gets the very same codes
                xq[m * k + g * group + i] = T.Cast("int8", T.round(
                    x[m * k + g * group + i] * T.if_then_else(amax[0] > T.float32(0), T.float32(127) / amax[0],
                                                              T.float32(0))))
                total[0] = total[0] + T.Cast("int32", xq[m * k + g * group + i])
            xc[m * ng + g] = T.Cast("float32", total[0]) * T.float32(centre)

    return body


def _accumulate(isa: Isa, bits: int, group: int, k: int, knobs: Knobs, both: bool, batch: int = 1, n: int = 0):
    """A macro: out[rows of tiles t0 … t0 + knobs.tiles − 1] += Σ_g s_w · s_x · (dot − c · Σ q), a
    vector of lanes rows at a time; with `both`, the same for (out2, W2, S2) in the same group loop.
    With a `batch` of inputs (rows of X4, xs and xc), out has a row of `n` outputs for each, and each
    vector of codes, decoded once, goes into the dot products of every input (LLVM merges the batch's
    identical loads and decodes)."""
    lanes, ng, chains = isa.lanes, k // group, knobs.chains
    f32, f16 = f"float32x{lanes}", f"float16x{lanes}"
    passes, vectors, tiles, unroll, ahead = TILE_ROWS // lanes // knobs.vectors, knobs.vectors, knobs.tiles, \
        knobs.unroll, knobs.prefetch
    # the bit planes: (first word, words per group); the group's words of a tile are TILE_ROWS words each (a cache line)
    lo_first, lo_words = 0, group * planes(bits)[0] // 32
    hi_first, hi_words = k * planes(bits)[0] // 32, group * planes(bits)[-1] // 32
    two_planes = len(planes(bits)) > 1

    def dot(W, X4, x0, t, g, sub):
        return _group_dot(isa, W, X4, x0, t, g, sub, bits, group, k, chains)

    def line(W, t, word):  # prefetch (read, keep in every cache level) the cache line of the tile's word
        return tirx.call_intrin("void", "tirx.prefetch", tirx.address_of(W[t, word, 0]), 0, 3, 1)

    @T.macro
    def fetch(W, t, g):  # group g + ahead of every plane (past the last tile: a harmless prefetch)
        for i in T.unroll(lo_words):
            T.evaluate(line(W, t, lo_first + (g + ahead) * lo_words + i))
        if two_planes:
            for i in T.unroll(hi_words):
                T.evaluate(line(W, t, hi_first + (g + ahead) * hi_words + i))

    @T.macro
    def update(out, W, S, X4, xs, xc, t, g, sub, m):
        out[T.ramp(m * n + t * TILE_ROWS + sub * lanes, 1, lanes)] = \
            out.vload([m * n + t * TILE_ROWS + sub * lanes], f32) + \
            T.Cast(f32, S.vload([t, g, sub * lanes], f16)) * T.Broadcast(xs[m * ng + g], lanes) * \
            (T.Cast(f32, dot(W, X4, m * (k // 4), t, g, sub)) - T.Broadcast(xc[m * ng + g], lanes))

    @T.macro
    def body(out, W, S, out2, W2, S2, X4, xs, xc, t0):
        for p in T.unroll(passes):
            for go in range(ng // unroll):
                for gi in T.unroll(unroll):
                    for j in T.unroll(tiles):
                        if ahead > 0:
                            fetch(W, t0 + j, go * unroll + gi)
                            if both:
                                fetch(W2, t0 + j, go * unroll + gi)
                        for v in T.unroll(vectors):
                            for m in T.unroll(batch):
                                update(out, W, S, X4, xs, xc, t0 + j, go * unroll + gi, p * vectors + v, m)
                                if both:
                                    update(out2, W2, S2, X4, xs, xc, t0 + j, go * unroll + gi, p * vectors + v, m)

    return body


class _InspectWithoutSource:
    """`inspect` as TVMScript's parser sees it while an integer-dot kernel is built: stack() and
    getouterframes() without each frame's source lines. prim_func and T.macro read only the frames'
    variables (the kernel's closure, the parser object) and the caller's line, to spot a class body
    (none here); looking the lines up scans every loaded module per frame, which took about a second
    per kernel in a test runner's deep stack with torch imported."""

    def __getattr__(self, name):
        return getattr(inspect, name)

    @staticmethod
    def getouterframes(frame, context: int = 1) -> list:
        frames = []
        while frame is not None:
            frames.append(inspect.FrameInfo(frame, frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name,
                                            None, None))
            frame = frame.f_back
        return frames

    def stack(self, context: int = 1) -> list:
        return self.getouterframes(sys._getframe(1))


# the TVMScript modules that look at the caller's frames: prim_func (entry) and T.macro (parser)
_TVMSCRIPT_MODULES = (_tvmscript_entry, _tvmscript_parser)


_PARSING = threading.RLock()  # one thread parses at a time, so each puts back the real `inspect`


@contextmanager
def _parsing():
    """TVMScript sees _InspectWithoutSource for the time of the block."""
    with _PARSING:
        saved = [m.inspect for m in _TVMSCRIPT_MODULES]
        for m in _TVMSCRIPT_MODULES:
            m.inspect = _InspectWithoutSource()
        try:
            yield
        finally:
            for m, was in zip(_TVMSCRIPT_MODULES, saved):
                m.inspect = was


def _memoized(builder):
    """The builder, returning the kernel it built before for the same arguments: parsing a kernel's
    TVMScript takes ~0.5 s, most of a small model's compile, and one process often builds the same
    kernels again (a compile per target or bitwidth, a bit-plan search, a test session). A PrimFunc
    is immutable, so one may sit in several modules. Arguments that cannot be hashed are not kept."""
    built: OrderedDict = OrderedDict()

    @functools.wraps(builder)
    def build(*args, **kwargs):
        key = (args, tuple(sorted(kwargs.items())))
        try:
            func = built.pop(key, None)
        except TypeError:
            with _parsing():
                return builder(*args, **kwargs)
        if func is None:
            with _parsing():
                func = builder(*args, **kwargs)
        built[key] = func  # most recent last
        if len(built) > MEMOIZED_KERNELS:
            built.popitem(last=False)
        return func

    return build


def _tagged(func: tvm.tirx.PrimFunc, knobs: Knobs) -> tvm.tirx.PrimFunc:
    """The kernel with its knobs in its attributes (the tuning records and the manifest read them)."""
    return func.with_attr(KNOBS_ATTR, json.dumps(asdict(knobs), sort_keys=True))


def knobs_of(func: tvm.tirx.PrimFunc) -> Knobs | None:
    """The knobs an integer-dot kernel was built with; None for any other kernel."""
    attrs = func.attrs
    return Knobs(**json.loads(str(attrs[KNOBS_ATTR]))) if attrs is not None and KNOBS_ATTR in attrs else None


def _rows_shape(batch: int, n: int) -> tuple:
    """A parameter of `batch` rows of n floats: a vector for one row (the decode kernels)."""
    return (n,) if batch == 1 else (batch, n)


@_memoized
def matvec(isa: Isa, n: int, k: int, bits: int, group: int, name: str, residual: bool = False,
           knobs: Knobs = Knobs(), grid: str = "half", batch: int = 1) -> tvm.tirx.PrimFunc:
    """y = W x (+ res) with W in the tiles layout (INT4 codes on `grid`): (codes, scales, x, [res], y), as
    kernels.matvec. With a `batch` > 1, x, res and y are that many rows, each row of y the same bits as
    the one-row kernel gives."""
    knobs = knobs.resolved(isa, n, k, bits, group)
    nt, ng, tiles = n // TILE_ROWS, k // group, knobs.tiles
    rows = tiles * TILE_ROWS
    loop = T.parallel if knobs.parallel else T.serial
    quantize_input = _quantize_input(k, group, centre(isa, bits, grid))
    accumulate = _accumulate(isa, bits, group, k, knobs, both=False, batch=batch, n=n)
    x_shape, y_shape = _rows_shape(batch, k), _rows_shape(batch, n)

    @T.macro
    def body(W, S, x_rows, res_rows, y_rows):
        x = T.decl_buffer((batch * k,), "float32", data=x_rows.data)
        res = T.decl_buffer((batch * n,), "float32", data=res_rows.data)
        y = T.decl_buffer((batch * n,), "float32", data=y_rows.data)
        xq = T.decl_buffer((batch * k,), "int8")
        X4 = T.decl_buffer((batch * k // 4,), "int32", data=xq.data)
        xs = T.decl_buffer((batch * ng,), "float32")
        xc = T.decl_buffer((batch * ng,), "float32")
        for m in range(batch):
            quantize_input(x, xq, xs, xc, m)
        for s in loop(nt // tiles):
            for m, i in T.grid(batch, rows):
                if residual:
                    y[m * n + s * rows + i] = res[m * n + s * rows + i]
                else:
                    y[m * n + s * rows + i] = T.float32(0)
            accumulate(y, W, S, y, W, S, X4, xs, xc, s * tiles)

    # only the variant asked for is parsed (TVMScript parsing is most of a kernel's build time)
    if residual:
        @T.prim_func
        def f(W: T.Buffer((nt, k * bits // 32, TILE_ROWS), "uint32"),
              S: T.Buffer((nt, ng, TILE_ROWS), "float16"), x: T.Buffer(x_shape, "float32"),
              res: T.Buffer(y_shape, "float32"), y: T.Buffer(y_shape, "float32")):
            T.func_attr({"global_symbol": name, "tir.noalias": True})
            body(W, S, x, res, y)
    else:
        @T.prim_func
        def f(W: T.Buffer((nt, k * bits // 32, TILE_ROWS), "uint32"), S: T.Buffer((nt, ng, TILE_ROWS), "float16"),
              x: T.Buffer(x_shape, "float32"), y: T.Buffer(y_shape, "float32")):
            T.func_attr({"global_symbol": name, "tir.noalias": True})
            body(W, S, x, y, y)  # no residual: the res argument is never read

    return _tagged(f, knobs)


@_memoized
def expert_gate_up(isa: Isa, cfg: MoEConfig, bits: int, group: int, knobs: Knobs = Knobs(), idim: int | None = None,
                   name: str | None = None, kind: str = "swiglu", bias: bool = False,
                   grid: str = "half", batch: int = 1) -> tvm.tirx.PrimFunc:
    """h = act(Wg x (+ bg), Wu x (+ bu)), Wg and Wu in the tiles layout (INT4 codes on `grid`), act
    the activation `kind` (kernels.activation); x is quantized once for both. With `bias`, the biases
    are inputs after the weights. `idim` and `name` default to the routed experts' (a shared expert
    has its own). With a `batch` > 1, x and h are that many rows, each row's h the same bits as the
    one-row kernel gives."""
    from .kernels import activation

    hdim, idim = cfg.hidden_size, idim or cfg.expert_intermediate
    name = name or f"em_expert_gate_up_w{bits}"
    knobs = knobs.resolved(isa, idim, hdim, bits, group, matrices=2)
    nt, ng, kw, tiles, fuse = idim // TILE_ROWS, hdim // group, hdim * bits // 32, knobs.tiles, knobs.fuse
    rows = tiles * TILE_ROWS
    loop = T.parallel if knobs.parallel else T.serial
    quantize_input = _quantize_input(hdim, group, centre(isa, bits, grid))
    accumulate = _accumulate(isa, bits, group, hdim, knobs, both=fuse, batch=batch, n=idim)
    x_shape, h_shape = _rows_shape(batch, hdim), _rows_shape(batch, idim)

    @T.macro
    def body(x_rows, GW, GS, UW, US, GB, UB, h_rows):
        x = T.decl_buffer((batch * hdim,), "float32", data=x_rows.data)
        h = T.decl_buffer((batch * idim,), "float32", data=h_rows.data)
        xq = T.decl_buffer((batch * hdim,), "int8")
        X4 = T.decl_buffer((batch * hdim // 4,), "int32", data=xq.data)
        xs = T.decl_buffer((batch * ng,), "float32")
        xc = T.decl_buffer((batch * ng,), "float32")
        gate = T.decl_buffer((batch * idim,), "float32")
        for m in range(batch):
            quantize_input(x, xq, xs, xc, m)
        for s in loop(nt // tiles):
            for m, i in T.grid(batch, rows):
                if bias:
                    gate[m * idim + s * rows + i] = GB[s * rows + i]
                    h[m * idim + s * rows + i] = UB[s * rows + i]
                else:
                    gate[m * idim + s * rows + i] = T.float32(0)
                    h[m * idim + s * rows + i] = T.float32(0)
            if fuse:
                accumulate(gate, GW, GS, h, UW, US, X4, xs, xc, s * tiles)
            else:
                accumulate(gate, GW, GS, gate, GW, GS, X4, xs, xc, s * tiles)
                accumulate(h, UW, US, h, UW, US, X4, xs, xc, s * tiles)
            for m, i in T.grid(batch, rows):
                h[m * idim + s * rows + i] = activation(cfg, kind, gate[m * idim + s * rows + i],
                                                        h[m * idim + s * rows + i])

    if bias:
        @T.prim_func
        def f(x: T.Buffer(x_shape, "float32"), GW: T.Buffer((nt, kw, TILE_ROWS), "uint32"),
              GS: T.Buffer((nt, ng, TILE_ROWS), "float16"), UW: T.Buffer((nt, kw, TILE_ROWS), "uint32"),
              US: T.Buffer((nt, ng, TILE_ROWS), "float16"), gate_bias: T.Buffer((idim,), "float32"),
              up_bias: T.Buffer((idim,), "float32"), h: T.Buffer(h_shape, "float32")):
            T.func_attr({"global_symbol": name, "tir.noalias": True})
            body(x, GW, GS, UW, US, gate_bias, up_bias, h)
    else:
        @T.prim_func
        def f(x: T.Buffer(x_shape, "float32"), GW: T.Buffer((nt, kw, TILE_ROWS), "uint32"),
              GS: T.Buffer((nt, ng, TILE_ROWS), "float16"), UW: T.Buffer((nt, kw, TILE_ROWS), "uint32"),
              US: T.Buffer((nt, ng, TILE_ROWS), "float16"), h: T.Buffer(h_shape, "float32")):
            T.func_attr({"global_symbol": name, "tir.noalias": True})
            body(x, GW, GS, UW, US, h, h, h)  # no biases: GB and UB are never read

    return _tagged(f, knobs)


@_memoized
def expert_up_relu(isa: Isa, cfg: MoEConfig, bits: int, group: int, knobs: Knobs = Knobs(), idim: int | None = None,
                   name: str | None = None, grid: str = "half", batch: int = 1) -> tvm.tirx.PrimFunc:
    """h = relu(Wu x), Wu in the tiles layout (a ReLU expert's or dense MLP's first matrix); `batch`
    rows of x and h as expert_gate_up's."""
    hdim, idim = cfg.hidden_size, idim or cfg.expert_intermediate
    name = name or f"em_expert_up_relu_w{bits}"
    knobs = knobs.resolved(isa, idim, hdim, bits, group)
    nt, ng, kw, tiles = idim // TILE_ROWS, hdim // group, hdim * bits // 32, knobs.tiles
    rows = tiles * TILE_ROWS
    loop = T.parallel if knobs.parallel else T.serial
    quantize_input = _quantize_input(hdim, group, centre(isa, bits, grid))
    accumulate = _accumulate(isa, bits, group, hdim, knobs, both=False, batch=batch, n=idim)
    x_shape, h_shape = _rows_shape(batch, hdim), _rows_shape(batch, idim)

    @T.prim_func
    def f(x: T.Buffer(x_shape, "float32"), UW: T.Buffer((nt, kw, TILE_ROWS), "uint32"),
          US: T.Buffer((nt, ng, TILE_ROWS), "float16"), h: T.Buffer(h_shape, "float32")):
        T.func_attr({"global_symbol": name, "tir.noalias": True})
        xv = T.decl_buffer((batch * hdim,), "float32", data=x.data)
        hv = T.decl_buffer((batch * idim,), "float32", data=h.data)
        xq = T.decl_buffer((batch * hdim,), "int8")
        X4 = T.decl_buffer((batch * hdim // 4,), "int32", data=xq.data)
        xs = T.decl_buffer((batch * ng,), "float32")
        xc = T.decl_buffer((batch * ng,), "float32")
        for m in range(batch):
            quantize_input(xv, xq, xs, xc, m)
        for s in loop(nt // tiles):
            for m, i in T.grid(batch, rows):
                hv[m * idim + s * rows + i] = T.float32(0)
            accumulate(hv, UW, US, hv, UW, US, X4, xs, xc, s * tiles)
            for m, i in T.grid(batch, rows):
                hv[m * idim + s * rows + i] = T.max(hv[m * idim + s * rows + i], T.float32(0))

    return _tagged(f, knobs)


@_memoized
def expert_down(isa: Isa, cfg: MoEConfig, bits: int, group: int, knobs: Knobs = Knobs(), idim: int | None = None,
                name: str | None = None, bias: bool = False, grid: str = "half", batch: int = 1) -> tvm.tirx.PrimFunc:
    """y = res + weight · (Wd h (+ bd)), Wd in the tiles layout: the router weight and residual
    fused; with `bias`, bd is an input after the weights. With a `batch` > 1, h, res, weight and y are
    that many rows, each row of y the same bits as the one-row kernel gives."""
    hdim, idim = cfg.hidden_size, idim or cfg.expert_intermediate
    name = name or f"em_expert_down_w{bits}"
    knobs = knobs.resolved(isa, hdim, idim, bits, group)
    nt, ng, kw, tiles = hdim // TILE_ROWS, idim // group, idim * bits // 32, knobs.tiles
    rows = tiles * TILE_ROWS
    loop = T.parallel if knobs.parallel else T.serial
    quantize_input = _quantize_input(idim, group, centre(isa, bits, grid))
    accumulate = _accumulate(isa, bits, group, idim, knobs, both=False, batch=batch, n=hdim)
    h_shape, y_shape = _rows_shape(batch, idim), _rows_shape(batch, hdim)

    @T.macro
    def body(h_rows, DW, DS, DB, res_rows, weight, y_rows):
        h = T.decl_buffer((batch * idim,), "float32", data=h_rows.data)
        res = T.decl_buffer((batch * hdim,), "float32", data=res_rows.data)
        y = T.decl_buffer((batch * hdim,), "float32", data=y_rows.data)
        xq = T.decl_buffer((batch * idim,), "int8")
        X4 = T.decl_buffer((batch * idim // 4,), "int32", data=xq.data)
        xs = T.decl_buffer((batch * ng,), "float32")
        xc = T.decl_buffer((batch * ng,), "float32")
        for m in range(batch):
            quantize_input(h, xq, xs, xc, m)
        for m, g in T.grid(batch, ng):
            xs[m * ng + g] = xs[m * ng + g] * weight[m]  # fold the router weight into the input scale
        for s in loop(nt // tiles):
            for m, i in T.grid(batch, rows):
                if bias:
                    y[m * hdim + s * rows + i] = res[m * hdim + s * rows + i] + weight[m] * DB[s * rows + i]
                else:
                    y[m * hdim + s * rows + i] = res[m * hdim + s * rows + i]
            accumulate(y, DW, DS, y, DW, DS, X4, xs, xc, s * tiles)

    if bias:
        @T.prim_func
        def f(h: T.Buffer(h_shape, "float32"), DW: T.Buffer((nt, kw, TILE_ROWS), "uint32"),
              DS: T.Buffer((nt, ng, TILE_ROWS), "float16"), down_bias: T.Buffer((hdim,), "float32"),
              res: T.Buffer(y_shape, "float32"), weight: T.Buffer((batch,), "float32"),
              y: T.Buffer(y_shape, "float32")):
            T.func_attr({"global_symbol": name, "tir.noalias": True})
            body(h, DW, DS, down_bias, res, weight, y)
    else:
        @T.prim_func
        def f(h: T.Buffer(h_shape, "float32"), DW: T.Buffer((nt, kw, TILE_ROWS), "uint32"),
              DS: T.Buffer((nt, ng, TILE_ROWS), "float16"), res: T.Buffer(y_shape, "float32"),
              weight: T.Buffer((batch,), "float32"), y: T.Buffer(y_shape, "float32")):
            T.func_attr({"global_symbol": name, "tir.noalias": True})
            body(h, DW, DS, res, res, weight, y)  # no bias: DB is never read

    return _tagged(f, knobs)
