"""Integer-dot kernels: int8 activations × packed weight codes, int32 accumulation.

The float kernels of kernels.py dequantize every weight to float32 (shift, mask, convert, centre,
scale) before an FMA, and are bound by those instructions rather than by memory. These kernels
instead quantize the input vector once per call to int8, one scale per group of G inputs
(s_x = max|x| / 127), and multiply it with the weights' codes in integer arithmetic:

    y[r] = Σ_g s_w[r, g] · s_x[g] · (Σ_{k ∈ g} u[r, k] · q[k]  −  c · Σ_{k ∈ g} q[k])

where u are the unsigned codes and c their centre (quantize.py's tiles layout). The inner sum is
AVX-512 VNNI's `vpdpbusd` (64 byte products, summed four at a time into 16 int32 lanes): for a
tile of 16 rows it takes one vector of words per 4, 8 or 16 columns (INT8/4/2), masked to bytes.
c · Σ q depends on the group alone, so it is computed once per call, not per row.

The kernels are written directly in TIR (TVMScript) rather than as tensor expressions to be
scheduled: the vector types, the two interleaved accumulation chains and the intrinsic are the
schedule. Each call quantizes its own input into a small workspace, so the C runtime calls them
exactly like the float kernels (same arguments, float32 input and output).
"""
from __future__ import annotations

import tvm
from tvm import tirx
from tvm.script import tirx as T

from ..models import MoEConfig
from .quantize import TILE_ROWS, code_centre

ISA_FEATURE = "avx512vnni"
VPDPBUSD = "llvm.x86.avx512.vpdpbusd.512"  # (int32x16 acc, u8x64, s8x64) -> int32x16
LANES = 16  # int32 lanes of one 512-bit vector: one per row of a tile
assert LANES == TILE_ROWS


def supported(target: tvm.target.Target) -> bool:
    """Whether `target` has the integer dot-product instruction these kernels use."""
    from tvm.target import codegen

    return bool(codegen.target_has_features(ISA_FEATURE, target))


def _vec(value, dtype: str):
    return tirx.Broadcast(tirx.const(value, dtype), LANES)


def _group_dot(W, X4, t, g, bits: int, group: int):
    """int32x16: Σ over the columns of group g of u · q, for the 16 rows of tile t. Two independent
    accumulation chains keep the vpdpbusd latency off the critical path."""
    per, fields = 32 // bits, 8 // bits
    words = group // per
    mask = 0xFFFFFFFF if bits == 8 else ((1 << bits) - 1) * 0x01010101
    chains: list = [_vec(0, "int32"), _vec(0, "int32")]
    n = 0
    for w in range(words):
        word = W.vload([t, g * words + w, 0], f"uint32x{LANES}")
        for j in range(fields):
            codes = word if bits == 8 else (word >> _vec(j * bits, "uint32")) & _vec(mask, "uint32")
            # 4 activation codes (columns w·p + 4j .. + 3 of the group), as one int32, to every lane
            act = tirx.Broadcast(X4[g * (group // 4) + w * (per // 4) + j], LANES)
            chains[n % 2] = tirx.call_llvm_pure_intrin(f"int32x{LANES}", VPDPBUSD, chains[n % 2],
                                                       tirx.reinterpret("int8x64", codes),
                                                       tirx.reinterpret("int8x64", act))
            n += 1
    return chains[0] + chains[1]


def _quantize_input(x, k: int, group: int, centre: float):
    """A macro: x (float32 [k]) → q (int8, also seen 4 per int32), s_x, and c · Σ q per group."""

    @T.macro
    def body(xq, xs, xc):
        for g in range(k // group):
            amax = T.decl_buffer((1,), "float32", scope="local")
            total = T.decl_buffer((1,), "int32", scope="local")
            amax[0] = T.float32(0)
            for i in range(group):
                amax[0] = T.max(amax[0], T.fabs(x[g * group + i]))
            xs[g] = amax[0] / T.float32(127)
            total[0] = 0
            for i in range(group):
                # one product, rounded half to even: nothing for the compiler to contract into an FMA,
                # so models/reference.py quantize_activation gets the very same codes
                xq[g * group + i] = T.Cast("int8", T.round(
                    x[g * group + i] * T.if_then_else(amax[0] > T.float32(0), T.float32(127) / amax[0], T.float32(0))))
                total[0] = total[0] + T.Cast("int32", xq[g * group + i])
            xc[g] = T.Cast("float32", total[0]) * T.float32(centre)

    return body


def matvec(n: int, k: int, bits: int, group: int, name: str, residual: bool = False,
           parallel: bool = True) -> tvm.tirx.PrimFunc:
    """y = W x (+ res) with W in the tiles layout: (codes, scales, x, [res], y), as kernels.matvec."""
    nt, ng, centre = n // TILE_ROWS, k // group, code_centre(bits, "tiles")
    loop = T.parallel if parallel else T.serial

    def dot(W, X4, t, g):
        return _group_dot(W, X4, t, g, bits, group)

    @T.prim_func
    def plain(W: T.Buffer((nt, k * bits // 32, LANES), "uint32"), S: T.Buffer((nt, ng, LANES), "float16"),
              x: T.Buffer((k,), "float32"), y: T.Buffer((n,), "float32")):
        T.func_attr({"global_symbol": name, "tir.noalias": True})
        xq = T.decl_buffer((k,), "int8")
        X4 = T.decl_buffer((k // 4,), "int32", data=xq.data)
        xs = T.decl_buffer((ng,), "float32")
        xc = T.decl_buffer((ng,), "float32")
        _quantize_input(x, k, group, centre)(xq, xs, xc)
        for t in loop(nt):
            y[T.ramp(t * LANES, 1, LANES)] = T.Broadcast(T.float32(0), LANES)
            for g in range(ng):
                y[T.ramp(t * LANES, 1, LANES)] = y.vload([t * LANES], "float32x16") + \
                    T.Cast("float32x16", S.vload([t, g, 0], "float16x16")) * T.Broadcast(xs[g], LANES) * \
                    (T.Cast("float32x16", dot(W, X4, t, g)) - T.Broadcast(xc[g], LANES))

    @T.prim_func
    def with_residual(W: T.Buffer((nt, k * bits // 32, LANES), "uint32"), S: T.Buffer((nt, ng, LANES), "float16"),
                      x: T.Buffer((k,), "float32"), res: T.Buffer((n,), "float32"), y: T.Buffer((n,), "float32")):
        T.func_attr({"global_symbol": name, "tir.noalias": True})
        xq = T.decl_buffer((k,), "int8")
        X4 = T.decl_buffer((k // 4,), "int32", data=xq.data)
        xs = T.decl_buffer((ng,), "float32")
        xc = T.decl_buffer((ng,), "float32")
        _quantize_input(x, k, group, centre)(xq, xs, xc)
        for t in loop(nt):
            y[T.ramp(t * LANES, 1, LANES)] = res.vload([t * LANES], "float32x16")
            for g in range(ng):
                y[T.ramp(t * LANES, 1, LANES)] = y.vload([t * LANES], "float32x16") + \
                    T.Cast("float32x16", S.vload([t, g, 0], "float16x16")) * T.Broadcast(xs[g], LANES) * \
                    (T.Cast("float32x16", dot(W, X4, t, g)) - T.Broadcast(xc[g], LANES))

    return with_residual if residual else plain


def expert_gate_up(cfg: MoEConfig, bits: int, group: int, parallel: bool = True) -> tvm.tirx.PrimFunc:
    """h = silu(Wg x) * (Wu x), Wg and Wu in the tiles layout; x is quantized once for both."""
    hdim, idim = cfg.hidden_size, cfg.expert_intermediate
    nt, ng, kw, centre = idim // TILE_ROWS, hdim // group, hdim * bits // 32, code_centre(bits, "tiles")
    loop = T.parallel if parallel else T.serial

    def dot(W, X4, t, g):
        return _group_dot(W, X4, t, g, bits, group)

    @T.prim_func
    def f(x: T.Buffer((hdim,), "float32"), GW: T.Buffer((nt, kw, LANES), "uint32"),
          GS: T.Buffer((nt, ng, LANES), "float16"), UW: T.Buffer((nt, kw, LANES), "uint32"),
          US: T.Buffer((nt, ng, LANES), "float16"), h: T.Buffer((idim,), "float32")):
        T.func_attr({"global_symbol": f"em_expert_gate_up_w{bits}", "tir.noalias": True})
        xq = T.decl_buffer((hdim,), "int8")
        X4 = T.decl_buffer((hdim // 4,), "int32", data=xq.data)
        xs = T.decl_buffer((ng,), "float32")
        xc = T.decl_buffer((ng,), "float32")
        gate = T.decl_buffer((idim,), "float32")
        _quantize_input(x, hdim, group, centre)(xq, xs, xc)
        for t in loop(nt):
            gate[T.ramp(t * LANES, 1, LANES)] = T.Broadcast(T.float32(0), LANES)
            h[T.ramp(t * LANES, 1, LANES)] = T.Broadcast(T.float32(0), LANES)
            for g in range(ng):
                gate[T.ramp(t * LANES, 1, LANES)] = gate.vload([t * LANES], "float32x16") + \
                    T.Cast("float32x16", GS.vload([t, g, 0], "float16x16")) * T.Broadcast(xs[g], LANES) * \
                    (T.Cast("float32x16", dot(GW, X4, t, g)) - T.Broadcast(xc[g], LANES))
                h[T.ramp(t * LANES, 1, LANES)] = h.vload([t * LANES], "float32x16") + \
                    T.Cast("float32x16", US.vload([t, g, 0], "float16x16")) * T.Broadcast(xs[g], LANES) * \
                    (T.Cast("float32x16", dot(UW, X4, t, g)) - T.Broadcast(xc[g], LANES))
            for i in range(LANES):
                h[t * LANES + i] = gate[t * LANES + i] / (T.float32(1) + T.exp(-gate[t * LANES + i])) * \
                    h[t * LANES + i]

    return f


def expert_down(cfg: MoEConfig, bits: int, group: int, parallel: bool = True) -> tvm.tirx.PrimFunc:
    """y = res + weight · (Wd h), Wd in the tiles layout: the router weight and residual fused."""
    hdim, idim = cfg.hidden_size, cfg.expert_intermediate
    nt, ng, kw, centre = hdim // TILE_ROWS, idim // group, idim * bits // 32, code_centre(bits, "tiles")
    loop = T.parallel if parallel else T.serial

    def dot(W, X4, t, g):
        return _group_dot(W, X4, t, g, bits, group)

    @T.prim_func
    def f(h: T.Buffer((idim,), "float32"), DW: T.Buffer((nt, kw, LANES), "uint32"),
          DS: T.Buffer((nt, ng, LANES), "float16"), res: T.Buffer((hdim,), "float32"),
          weight: T.Buffer((1,), "float32"), y: T.Buffer((hdim,), "float32")):
        T.func_attr({"global_symbol": f"em_expert_down_w{bits}", "tir.noalias": True})
        xq = T.decl_buffer((idim,), "int8")
        X4 = T.decl_buffer((idim // 4,), "int32", data=xq.data)
        xs = T.decl_buffer((ng,), "float32")
        xc = T.decl_buffer((ng,), "float32")
        _quantize_input(h, idim, group, centre)(xq, xs, xc)
        for g in range(ng):
            xs[g] = xs[g] * weight[0]  # fold the router weight into the activation scale
        for t in loop(nt):
            y[T.ramp(t * LANES, 1, LANES)] = res.vload([t * LANES], "float32x16")
            for g in range(ng):
                y[T.ramp(t * LANES, 1, LANES)] = y.vload([t * LANES], "float32x16") + \
                    T.Cast("float32x16", DS.vload([t, g, 0], "float16x16")) * T.Broadcast(xs[g], LANES) * \
                    (T.Cast("float32x16", dot(DW, X4, t, g)) - T.Broadcast(xc[g], LANES))

    return f
