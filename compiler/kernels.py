"""TVM tensor-expression definitions of every kernel the decode loop calls.

Each builder returns a TIR PrimFunc whose parameters are (inputs..., outputs...). The C runtime
calls them through TVM's FFI packed-call ABI by name, so the names here are the runtime's
contract: see runtime_c/kernels.c. Quantized expert kernels read the packed layout of
compiler/quantize.py and dequantize in registers; no float copy of an expert is ever made.
"""
from __future__ import annotations

import tvm
from tvm import te

from ..models import MoEConfig
from .program import (BATCH_ROWS, BATCH_SUFFIX, EXPERT_KERNELS, KERNEL_SIGNATURES, KERNELS, KV_CACHE_DTYPES,
                      KV_CACHE_PARAMS, SIGNATURES, expert_kernel_roles, kernel_role, kernel_symbol)
from .quantize import DEFAULT_TRUNK_BITS, code_centre, grid_at, interleave, planes

F32 = "float32"


def _named(f: te.Tensor, args: list[te.Tensor], name: str) -> tvm.tirx.PrimFunc:
    return te.create_prim_func(args).with_attr("global_symbol", name)


def rmsnorm(h: int, eps: float, name: str = "em_rmsnorm") -> tvm.tirx.PrimFunc:
    x = te.placeholder((h,), F32, name="x")
    w = te.placeholder((h,), F32, name="w")
    k = te.reduce_axis((0, h), name="k")
    ss = te.compute((1,), lambda _: te.sum(x[k] * x[k], axis=k), name="ss")
    inv = te.compute((1,), lambda _: 1.0 / te.sqrt(ss[0] / h + tvm.tirx.const(eps, F32)), name="inv")
    y = te.compute((h,), lambda i: x[i] * inv[0] * w[i], name="y")
    return _named(y, [x, w, y], name)


def layernorm(h: int, eps: float, name: str = "em_layernorm") -> tvm.tirx.PrimFunc:
    """y = (x - mean) / sqrt(variance + eps) · w + b (the biased variance, as torch's LayerNorm)."""
    x = te.placeholder((h,), F32, name="x")
    w = te.placeholder((h,), F32, name="w")
    b = te.placeholder((h,), F32, name="b")
    k = te.reduce_axis((0, h), name="k")
    total = te.compute((1,), lambda _: te.sum(x[k], axis=k), name="total")
    mean = te.compute((1,), lambda _: total[0] / h, name="mean")
    kv = te.reduce_axis((0, h), name="kv")
    ss = te.compute((1,), lambda _: te.sum((x[kv] - mean[0]) * (x[kv] - mean[0]), axis=kv), name="ss")
    inv = te.compute((1,), lambda _: 1.0 / te.sqrt(ss[0] / h + tvm.tirx.const(eps, F32)), name="inv")
    y = te.compute((h,), lambda i: (x[i] - mean[0]) * inv[0] * w[i] + b[i], name="y")
    return _named(y, [x, w, b, y], name)


def matvec(n: int, k: int, name: str, residual: bool = False, bits: int = 32, group: int = 32,
           grid: str = "half") -> tvm.tirx.PrimFunc:
    """y = W x (+ r): a trunk projection, optionally with the residual add fused. W is float32
    [n, k] (bits 32) or packed at `bits` like an expert matrix (codes, scales; INT4 on `grid`)."""
    x = te.placeholder((k,), F32, name="x")
    if bits == 32:
        w = te.placeholder((n, k), F32, name="w")
        r = te.reduce_axis((0, k), name="r")
        acc = te.compute((n,), lambda i: te.sum(w[i, r] * x[r], axis=r), name="acc" if residual else "y")
        weights = [w]
    else:
        codes, scales = _qweight("w", n, k, bits, group)
        acc = te.compute((n,), _row_dot(codes, scales, bits, group, k, x, "r", grid), name="acc" if residual else "y")
        weights = [codes, scales]
    if not residual:
        return _named(acc, [*weights, x, acc], name)
    res = te.placeholder((n,), F32, name="res")
    y = te.compute((n,), lambda i: res[i] + acc[i], name="y")
    return _named(y, [*weights, x, res, y], name)


def add(h: int, name: str) -> tvm.tirx.PrimFunc:
    """y = a + b (a bias added to the residual stream)."""
    a = te.placeholder((h,), F32, name="a")
    b = te.placeholder((h,), F32, name="b")
    y = te.compute((h,), lambda i: a[i] + b[i], name="y")
    return _named(y, [a, b, y], name)


def qk_norm(cfg: MoEConfig, name: str) -> tvm.tirx.PrimFunc:
    """The fused qkv vector with q and k RMS-normalised (v copied): per head over head_dim with
    [head_dim] weights (qk_norm "head"), or over the whole q and the whole k ("full")."""
    hq, hkv, d, eps = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, tvm.tirx.const(cfg.norm_eps, F32)
    q_dim, kv_dim = hq * d, hkv * d
    per_head = cfg.qk_norm == "head"
    qkv = te.placeholder((q_dim + 2 * kv_dim,), F32, name="qkv")
    qw = te.placeholder((d if per_head else q_dim,), F32, name="qw")
    kw = te.placeholder((d if per_head else kv_dim,), F32, name="kw")
    span, nq, nk = (d, hq, hkv) if per_head else (q_dim, 1, 1)
    kspan = d if per_head else kv_dim
    rq, rk = te.reduce_axis((0, span), name="rq"), te.reduce_axis((0, kspan), name="rk")
    ss_q = te.compute((nq,), lambda h: te.sum(qkv[h * span + rq] * qkv[h * span + rq], axis=rq), name="ss_q")
    ss_k = te.compute((nk,), lambda h: te.sum(qkv[q_dim + h * kspan + rk] * qkv[q_dim + h * kspan + rk], axis=rk),
                      name="ss_k")
    inv_q = te.compute((nq,), lambda h: 1.0 / te.sqrt(ss_q[h] / span + eps), name="inv_q")
    inv_k = te.compute((nk,), lambda h: 1.0 / te.sqrt(ss_k[h] / kspan + eps), name="inv_k")

    def out(i):
        in_q, in_k = i < q_dim, i < q_dim + kv_dim
        qi, ki = i, i - q_dim
        qv = qkv[i] * inv_q[qi // span] * qw[qi % span if per_head else qi]
        kv = qkv[i] * inv_k[tvm.tirx.max(ki, 0) // kspan] * kw[tvm.tirx.max(ki, 0) % kspan]
        return tvm.tirx.Select(in_q, qv, tvm.tirx.Select(in_k, kv, qkv[i]))

    y = te.compute((q_dim + 2 * kv_dim,), out, name="y")
    return _named(y, [qkv, qw, kw, y], name)


def rope(cfg: MoEConfig, name: str = "em_rope") -> tvm.tirx.PrimFunc:
    """Split the fused qkv vector into q, k (both rotated) and v, writing k and v in place in the cache row."""
    hq, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    half = d // 2
    qkv = te.placeholder((hq * d + 2 * hkv * d,), F32, name="qkv")
    cos = te.placeholder((half,), F32, name="cos")
    sin = te.placeholder((half,), F32, name="sin")

    def rotated(base):
        def f(h, i):
            j = tvm.tirx.indexmod(i, half)
            a = qkv[base + h * d + j]
            b = qkv[base + h * d + j + half]
            return tvm.tirx.Select(i < half, a * cos[j] - b * sin[j], b * cos[j] + a * sin[j])

        return f

    q = te.compute((hq, d), rotated(0), name="q")
    k = te.compute((hkv, d), rotated(hq * d), name="k")
    v = te.compute((hkv, d), lambda h, i: qkv[hq * d + hkv * d + h * d + i], name="v")
    return _named(q, [qkv, cos, sin, q, k, v], name)


def _f32(x: tvm.tirx.PrimExpr) -> tvm.tirx.PrimExpr:
    """x as float32 (a float16 KV cache's element widened; float32 as it is)."""
    return x if x.dtype == F32 else x.astype(F32)


def softmax_exp(x: tvm.tirx.PrimExpr) -> tvm.tirx.PrimExpr:
    """e^x for a softmax's max-shifted scores (x <= 0), in arithmetic LLVM vectorizes: te.exp becomes a
    call to libm's scalar expf per element, which was 8% of a decode step on the bundled model.
    x = k·ln 2 + r with |r| <= ln 2 / 2 (ln 2 in two parts, so r keeps its bits), e^r by its Taylor
    polynomial to degree 7, 2^k built in the exponent field: within 1e-7 relative of e^x on
    [-87, 0] (measured; NumPy's float32 exp: 2e-7). Below -87 it gives e^-87 (1.6e-38), nothing
    beside the maximum's 1."""
    x = tvm.tirx.max(x, tvm.tirx.const(-87.0, F32))
    k = tvm.tirx.floor(x * tvm.tirx.const(1.4426950408889634, F32) + tvm.tirx.const(0.5, F32))
    r = x - k * tvm.tirx.const(0.693359375, F32) + k * tvm.tirx.const(2.12194440e-4, F32)
    p = tvm.tirx.const(1.0 / 5040, F32)
    for c in (1.0 / 720, 1.0 / 120, 1.0 / 24, 1.0 / 6, 0.5, 1.0, 1.0):
        p = p * r + tvm.tirx.const(c, F32)
    two_k = tvm.tirx.reinterpret(F32, (k.astype("int32") + 127) << 23)
    return p * two_k


def attention(cfg: MoEConfig, name: str = "em_attention", sinks: bool = False,
              position_bias: bool = False, kv_cache: str = F32) -> tvm.tirx.PrimFunc:
    """Single-query attention over n cache rows ([n, kv_heads, head_dim], of the `kv_cache` element
    type, read as float32; n is symbolic: the runtime passes a sliding window's rows alone). With
    `sinks`, a logit per head [heads] joins each softmax's denominator (its maximum included),
    carrying no value. With `position_bias`, a bias [heads, n] is added to the scores (T5's
    relative positions)."""
    hq, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    group = hq // hkv
    n = te.var("n", "int64")
    q = te.placeholder((hq, d), F32, name="q")
    kc = te.placeholder((n, hkv, d), kv_cache, name="kc")
    vc = te.placeholder((n, hkv, d), kv_cache, name="vc")
    scale = tvm.tirx.const(1.0 / d**0.5, F32)
    rd = te.reduce_axis((0, d), name="rd")
    s = te.compute((hq, n), lambda h, t: te.sum(q[h, rd] * _f32(kc[t, h // group, rd]) * scale, axis=rd), name="s")
    inputs = [q, kc, vc]
    score = lambda h, t: s[h, t]  # noqa: E731
    if position_bias:  # added where the scores are read: no third [heads, n] buffer
        bias = te.placeholder((hq, n), F32, name="bias")
        score = lambda h, t: s[h, t] + bias[h, t]  # noqa: E731
        inputs.append(bias)
    rt = te.reduce_axis((0, n), name="rt")
    mx = te.compute((hq,), lambda h: te.max(score(h, rt), axis=rt), name="mx")
    sink = te.placeholder((hq,), F32, name="sink") if sinks else None
    if sinks:
        mx = te.compute((hq,), lambda h: tvm.tirx.max(mx[h], sink[h]), name="mx_sink")
    e = te.compute((hq, n), lambda h, t: softmax_exp(score(h, t) - mx[h]), name="e")
    rz = te.reduce_axis((0, n), name="rz")
    z = te.compute((hq,), lambda h: te.sum(e[h, rz], axis=rz), name="z")
    if sinks:
        z = te.compute((hq,), lambda h: z[h] + softmax_exp(sink[h] - mx[h]), name="z_sink")
    rv = te.reduce_axis((0, n), name="rv")
    o = te.compute((hq, d), lambda h, i: te.sum(e[h, rv] * _f32(vc[rv, h // group, i]) / z[h], axis=rv), name="o")
    return _named(o, [*inputs, *([sink] if sinks else []), o], name)


def mla_rope(cfg: MoEConfig, name: str) -> tvm.tirx.PrimFunc:
    """Multi-head latent attention's RoPE: each head's rotated part of the query vector q [heads · (nope
    + head_dim)] (its last head_dim dims), and the shared key kr [head_dim], rotated (rotate-half
    pairs), into q_rot [heads, head_dim] and k_rot [head_dim] (the KV cache's row)."""
    h, d, qk, nope = cfg.num_heads, cfg.head_dim, cfg.qk_head_dim, cfg.qk_nope_head_dim
    half = d // 2
    q = te.placeholder((h * qk,), F32, name="q")
    kr = te.placeholder((d,), F32, name="kr")
    cos = te.placeholder((half,), F32, name="cos")
    sin = te.placeholder((half,), F32, name="sin")

    def rotated(x, i):  # x(k): the k-th dim of the part being rotated
        j = tvm.tirx.indexmod(i, half)
        return tvm.tirx.Select(i < half, x(j) * cos[j] - x(j + half) * sin[j], x(j + half) * cos[j] + x(j) * sin[j])

    q_rot = te.compute((h, d), lambda hh, i: rotated(lambda k: q[hh * qk + nope + k], i), name="q_rot")
    k_rot = te.compute((d,), lambda i: rotated(lambda k: kr[k], i), name="k_rot")
    return _named(q_rot, [q, kr, cos, sin, q_rot, k_rot], name)


def mla_absorb(cfg: MoEConfig, name: str) -> tvm.tirx.PrimFunc:
    """Each head's unrotated query folded through its key rows of wkv_b into the latent space:
    q_lat[h, c] = sum_i q[h, i] · wkv_b[h · (nope + v) + i, c], so that q_lat · latent = q_nope · k_nope."""
    h, qk, nope, v, r = cfg.num_heads, cfg.qk_head_dim, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    q = te.placeholder((h * qk,), F32, name="q")
    w = te.placeholder((h * (nope + v), r), F32, name="wkv_b")
    i = te.reduce_axis((0, nope), name="i")
    q_lat = te.compute((h, r), lambda hh, c: te.sum(q[hh * qk + i] * w[hh * (nope + v) + i, c], axis=i), name="q_lat")
    return _named(q_lat, [q, w, q_lat], name)


def mla_attention(cfg: MoEConfig, name: str, kv_cache: str = F32) -> tvm.tirx.PrimFunc:
    """Single-query latent attention over the first n cache rows (of the `kv_cache` element type): scores
    (q_lat · latent + q_rot · k_rot) × the softmax scale, and per head the softmax-weighted sum of the
    latents, o_lat [heads, kv_lora_rank]; n is symbolic. One score buffer and one of exponentials,
    [heads, n] each, as em_attention."""
    h, d, r = cfg.num_heads, cfg.head_dim, cfg.kv_lora_rank
    n = te.var("n", "int64")
    q_lat = te.placeholder((h, r), F32, name="q_lat")
    q_rot = te.placeholder((h, d), F32, name="q_rot")
    lat = te.placeholder((n, r), kv_cache, name="latent")
    kr = te.placeholder((n, d), kv_cache, name="k_rot")
    scale = tvm.tirx.const(cfg.softmax_scale, F32)
    rk = te.reduce_axis((0, r + d), name="rk")

    def term(hh, t, k):  # the latent's dims, then the rotated ones (indices clamped: Select reads both sides)
        lo, hi = tvm.tirx.min(k, r - 1), tvm.tirx.max(k - r, 0)
        return tvm.tirx.Select(k < r, q_lat[hh, lo] * _f32(lat[t, lo]), q_rot[hh, hi] * _f32(kr[t, hi]))

    s = te.compute((h, n), lambda hh, t: te.sum(term(hh, t, rk) * scale, axis=rk), name="s")
    rt = te.reduce_axis((0, n), name="rt")
    mx = te.compute((h,), lambda hh: te.max(s[hh, rt], axis=rt), name="mx")
    e = te.compute((h, n), lambda hh, t: softmax_exp(s[hh, t] - mx[hh]), name="e")
    rz = te.reduce_axis((0, n), name="rz")
    z = te.compute((h,), lambda hh: te.sum(e[hh, rz], axis=rz), name="z")
    rv = te.reduce_axis((0, n), name="rv")
    o = te.compute((h, r), lambda hh, c: te.sum(e[hh, rv] * _f32(lat[rv, c]) / z[hh], axis=rv), name="o_lat")
    return _named(o, [q_lat, q_rot, lat, kr, o], name)


def mla_v(cfg: MoEConfig, name: str) -> tvm.tirx.PrimFunc:
    """Each head's latent output through its value rows of wkv_b: att[h · v + j] = sum_c
    wkv_b[h · (nope + v) + nope + j, c] · o_lat[h, c], the output projection's input."""
    h, nope, v, r = cfg.num_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    o_lat = te.placeholder((h, r), F32, name="o_lat")
    w = te.placeholder((h * (nope + v), r), F32, name="wkv_b")
    c = te.reduce_axis((0, r), name="c")
    att = te.compute((h * v,), lambda o: te.sum(w[(o // v) * (nope + v) + nope + o % v, c] * o_lat[o // v, c], axis=c),
                     name="att")
    return _named(att, [o_lat, w, att], name)


def _row_dot(packed: te.Tensor, scales: te.Tensor, bits: int, group: int, k: int, vec: te.Tensor, name: str,
             grid: str = "half"):
    """row -> sum_c W[row, c] · vec[c] for a quantized W (quantize.py's layout, INT4 on `grid`), dequantizing in
    registers. The reduction is written over (block, shift, lane) so that the lane axis, which
    the schedule vectorizes, walks consecutive words and consecutive columns: contiguous loads,
    one scale per vector."""
    if bits in (16, 32):
        r = te.reduce_axis((0, k), name=name + "_k")
        return lambda row: te.sum(packed[row, r].astype(F32) * vec[r], axis=r)
    if bits == 8:
        lanes = interleave(8, k, group)
        rt, ri = te.reduce_axis((0, k // lanes), name=name + "_t"), te.reduce_axis((0, lanes), name=name + "_i")
        return lambda row: te.sum(packed[row, rt * lanes + ri].astype(F32) *
                                  scales[row, rt * lanes // group].astype(F32) * vec[rt * lanes + ri], axis=[rt, ri])
    # column rt·L·p + rj·L + ri, p the codes per word of the narrowest plane (quantize.planes); a
    # plane of b bits holds it in word rt·L·p/per_b + rj // per_b · L + ri at bit (rj % per_b)·b
    lanes, per = interleave(bits, k, group), 32 // min(planes(bits))
    centre = tvm.tirx.const(code_centre(bits, grid=grid), F32)
    rt = te.reduce_axis((0, k // (lanes * per)), name=name + "_t")
    rj = te.reduce_axis((0, per), name=name + "_j")
    ri = te.reduce_axis((0, lanes), name=name + "_i")

    def dot(row):
        col = rt * (lanes * per) + rj * lanes  # first column of this vector of `lanes` codes
        code, first, low = None, 0, 0
        for b in planes(bits):
            per_b = 32 // b
            block = rt if per_b == per else rt * (per // per_b) + rj // per_b
            field = rj if per_b == per else rj % per_b
            part = (packed[row, first + block * lanes + ri] >> (field * b).astype("uint32")) & \
                tvm.tirx.const((1 << b) - 1, "uint32")
            code = part if code is None else code | (part << tvm.tirx.const(low, "uint32"))
            first, low = first + k * b // 32, low + b
        w = (code.astype("int32").astype(F32) - centre) * scales[row, col // group].astype(F32)
        return te.sum(w * vec[col + ri], axis=[rt, rj, ri])

    return dot


def _qweight(name: str, n: int, k: int, bits: int, group: int) -> tuple[te.Tensor, ...]:
    """The kernel parameters of an [n, k] weight at `bits`: (codes, scales), or (float16 weights,)."""
    if bits in (16, 32):
        return (te.placeholder((n, k), "float16" if bits == 16 else F32, name=name + "_h"),)
    codes = te.placeholder((n, k), "int8", name=name + "_q") if bits == 8 else \
        te.placeholder((n, k * bits // 32), "uint32", name=name + "_q")
    return (
        codes,
        te.placeholder((n, k // group), "float16", name=name + "_s"),
    )


def activation(cfg: MoEConfig, kind: str, g, u):
    """The expert activation `kind` (program.ACT, but "relu", which has no gate) of gate and up
    outputs g and u, as a TIR expression (also inside int_dot's TVMScript): silu(g)·u, or the clamped SwiGLU with the
    config's alpha and limit (models/reference.py activate computes the same in float32)."""
    one = tvm.tirx.const(1.0, F32)
    if kind == "swiglu":
        return g / (one + tvm.tirx.exp(-g)) * u
    limit, alpha = tvm.tirx.const(cfg.swiglu_limit, F32), tvm.tirx.const(cfg.swiglu_alpha, F32)
    g = tvm.tirx.min(g, limit)
    u = tvm.tirx.max(tvm.tirx.min(u, limit), -limit)
    return (u + one) * (g / (one + tvm.tirx.exp(-(alpha * g))))


def expert_symbol(role: str, bits: int, batch: int = 1) -> str:
    return EXPERT_KERNELS[role].format(bits=bits) + (BATCH_SUFFIX.format(batch=batch) if batch > 1 else "")


def expert_gate_up(cfg: MoEConfig, bits: int, group: int, idim: int | None = None, name: str | None = None,
                   kind: str = "swiglu", bias: bool = False, grid: str = "half") -> tvm.tirx.PrimFunc:
    """h = act(Wg x (+ bg), Wu x (+ bu)) with Wg, Wu packed at `bits` (32: float32; INT4 on `grid`),
    act the activation `kind`; with `bias` the biases are inputs after the weights. `idim` and
    `name` default to the routed experts' (a shared expert has its own)."""
    hdim, idim = cfg.hidden_size, idim or cfg.expert_intermediate
    x = te.placeholder((hdim,), F32, name="x")
    gw, uw = _qweight("gate", idim, hdim, bits, group), _qweight("up", idim, hdim, bits, group)
    g = te.compute((idim,), _row_dot(gw[0], gw[-1], bits, group, hdim, x, "rg", grid), name="g")
    u = te.compute((idim,), _row_dot(uw[0], uw[-1], bits, group, hdim, x, "ru", grid), name="u")
    biases = [te.placeholder((idim,), F32, name="gate_bias"), te.placeholder((idim,), F32, name="up_bias")] \
        if bias else []
    if bias:
        h = te.compute((idim,), lambda i: activation(cfg, kind, g[i] + biases[0][i], u[i] + biases[1][i]), name="h")
    else:
        h = te.compute((idim,), lambda i: activation(cfg, kind, g[i], u[i]), name="h")
    return _named(h, [x, *gw, *uw, *biases, h], name or expert_symbol("expert_gate_up", bits))


def expert_up_relu(cfg: MoEConfig, bits: int, group: int, idim: int | None = None,
                   name: str | None = None, grid: str = "half") -> tvm.tirx.PrimFunc:
    """h = relu(Wu x) with Wu packed at `bits` (a ReLU expert's or dense MLP's first matrix)."""
    hdim, idim = cfg.hidden_size, idim or cfg.expert_intermediate
    x = te.placeholder((hdim,), F32, name="x")
    uw = _qweight("up", idim, hdim, bits, group)
    u = te.compute((idim,), _row_dot(uw[0], uw[-1], bits, group, hdim, x, "ru", grid), name="u")
    h = te.compute((idim,), lambda i: te.max(u[i], tvm.tirx.const(0, F32)), name="h")
    return _named(h, [x, *uw, h], name or expert_symbol("expert_up_relu", bits))


def expert_down(cfg: MoEConfig, bits: int, group: int, idim: int | None = None, name: str | None = None,
                bias: bool = False, grid: str = "half") -> tvm.tirx.PrimFunc:
    """y = r + weight * (Wd h (+ bd)): the down projection with the router weight and residual
    fused; with `bias`, bd is an input after the weights."""
    hdim, idim = cfg.hidden_size, idim or cfg.expert_intermediate
    h = te.placeholder((idim,), F32, name="h")
    dw = _qweight("down", hdim, idim, bits, group)
    db = [te.placeholder((hdim,), F32, name="down_bias")] if bias else []
    res = te.placeholder((hdim,), F32, name="res")
    weight = te.placeholder((1,), F32, name="weight")
    acc = te.compute((hdim,), _row_dot(dw[0], dw[-1], bits, group, idim, h, "r", grid), name="acc")
    if bias:
        y = te.compute((hdim,), lambda i: res[i] + weight[0] * (acc[i] + db[0][i]), name="y")
    else:
        y = te.compute((hdim,), lambda i: res[i] + weight[0] * acc[i], name="y")
    return _named(y, [h, *dw, *db, res, weight, y], name or expert_symbol("expert_down", bits))


def check_signature(func: tvm.tirx.PrimFunc) -> None:
    """Refuse a kernel whose parameters differ from its role's signature in compiler/program.py
    (names, order, a matrix's one or two buffers), the order the runtime passes arguments in."""
    symbol = str(func.attrs["global_symbol"])
    signature = SIGNATURES[KERNEL_SIGNATURES[kernel_role(symbol)]]
    buffers = list(func.params)  # in this TVM a buffer parameter is a Var carrying the buffer's name and dtype
    got = [(b.name, str(b.dtype)) for b in buffers]
    i = 0
    for param in signature:
        if i >= len(buffers):
            raise ValueError(f"kernel {symbol}: parameters {got} end before {param!r} of its signature {signature}")
        if param.startswith("*"):  # float weights: one buffer; quantized: codes, then float16 scales
            quantized = str(buffers[i].dtype) in ("int8", "uint32")
            if quantized and (i + 1 >= len(buffers) or str(buffers[i + 1].dtype) != "float16"):
                raise ValueError(f"kernel {symbol}: matrix {param[1:]!r} has codes without float16 scales: {got}")
            i += 2 if quantized else 1
        else:
            allowed = KV_CACHE_DTYPES if param in KV_CACHE_PARAMS else (F32,)
            if buffers[i].name != param or str(buffers[i].dtype) not in allowed:
                raise ValueError(f"kernel {symbol}: parameter {i} is {got[i]}, its signature {signature} "
                                 f"says {' or '.join(allowed)} {param!r}")
            i += 1
    if i != len(buffers):
        raise ValueError(f"kernel {symbol}: parameters {got} beyond its signature {signature}")


def check_kv_cache(cfg: MoEConfig, kv_cache: str) -> None:
    """ValueError naming the fix where a model cannot keep its KV cache as `kv_cache` elements."""
    if kv_cache not in KV_CACHE_DTYPES:
        raise ValueError(f"KV cache element type {kv_cache!r}: choose one of {', '.join(KV_CACHE_DTYPES)}")
    if kv_cache != F32 and cfg.encoder_layers:
        raise ValueError(f"{cfg.arch} is an encoder-decoder model: its KV cache is float32 alone (the float16 "
                         "cache is implemented for decoder-only models); compile it with --kv-cache float32")


def decode_kernels(cfg: MoEConfig, expert_bits: list[int], group: int, trunk_bits: int = DEFAULT_TRUNK_BITS,
                   layout: str = "rows", target: tvm.target.Target | None = None,
                   variants: dict | None = None, int4_grid: str = "half",
                   kv_cache: str = F32) -> dict[str, tvm.tirx.PrimFunc]:
    """Every kernel one decode step needs, by the symbol the C runtime looks up (INT4 matrices, the
    experts' and the trunk's, on `int4_grid`: the artifact's; self-attention reading a KV cache of
    `kv_cache` elements, KV_CACHE_DTYPES). Quantized weights
    in the "rows" layout get the float-dequantizing kernels here; in the "tiles" layout, the
    integer-dot kernels of int_dot.py for `target`'s instruction, with the hand schedule. `variants`,
    when given, receives each integer-dot kernel's builder (int_dot.Knobs → the kernel with them:
    tuning.py's candidates, and the tuned kernels of a compile). The router always reads float32."""
    from functools import partial

    from . import int_dot

    check_kv_cache(cfg, kv_cache)
    hdim = cfg.hidden_size
    tiles = layout == "tiles"
    isa = int_dot.isa_for(target) if tiles and target is not None else None
    if tiles and isa is None:
        raise ValueError(f"the tiles layout needs a target with an int8 dot-product instruction; got {target}")

    def tiled(builder, *args, name, **kwargs):  # an integer-dot kernel with the hand schedule; its builder to variants
        build = partial(builder, isa, *args, name=name, **kwargs)
        if variants is not None:
            variants[name] = lambda k: build(knobs=k)
        return build()

    trunk_grid = grid_at(trunk_bits, int4_grid)

    def trunk_matvec(n, k, name, residual=False):
        if tiles and trunk_bits != 32:
            return tiled(int_dot.matvec, n, k, trunk_bits, group, name=name, residual=residual, grid=trunk_grid)
        return matvec(n, k, name, residual, bits=trunk_bits, group=group, grid=trunk_grid)

    relu = cfg.expert_activation == "relu"  # ReLU MLPs (Switch Transformers) have no gate: up, then down

    def resident_mlp(sdim, gate_up_name, down_name, relu=False):  # a shared expert or dense MLP, at the trunk's bitwidth
        gate_up, down = dict(idim=sdim, name=gate_up_name, grid=trunk_grid), dict(idim=sdim, name=down_name, grid=trunk_grid)
        if tiles and trunk_bits != 32:
            up = int_dot.expert_up_relu if relu else int_dot.expert_gate_up
            return [tiled(up, cfg, trunk_bits, group, **gate_up),
                    tiled(int_dot.expert_down, cfg, trunk_bits, group, **down)]
        up = expert_up_relu if relu else expert_gate_up
        return [up(cfg, trunk_bits, group, **gate_up), expert_down(cfg, trunk_bits, group, **down)]

    K = KERNELS
    if cfg.attention == "mla":
        R, Q = cfg.kv_lora_rank, cfg.q_lora_rank
        attention_kernels = [
            trunk_matvec(cfg.num_heads * cfg.qk_head_dim, Q or hdim, K["mla_q"]),
            trunk_matvec(R + cfg.head_dim, hdim, K["mla_kv_a"]), rmsnorm(R, cfg.lora_norm_eps, K["mla_kv_norm"]),
            mla_rope(cfg, K["mla_rope"]), mla_absorb(cfg, K["mla_absorb"]),
            mla_attention(cfg, kernel_symbol("mla_attention", kv_cache), kv_cache),
            mla_v(cfg, K["mla_v"])]
        if Q:
            attention_kernels += [trunk_matvec(Q, hdim, K["mla_q_a"]), rmsnorm(Q, cfg.lora_norm_eps, K["mla_q_a_norm"])]
    else:
        attention_kernels = [
            trunk_matvec(cfg.q_dim + 2 * cfg.kv_dim, hdim, K["qkv_bias"] if cfg.qkv_bias else K["qkv"],
                         residual=cfg.qkv_bias),
        ]
        if cfg.position == "relative":  # T5's bias in place of RoPE (encoder-decoder: a float32 cache)
            attention_kernels.append(attention(cfg, K["attention_bias"], position_bias=True))
        else:
            attention_kernels += [rope(cfg, K["rope"]),
                                  attention(cfg, kernel_symbol("attention_sinks", kv_cache), sinks=True, kv_cache=kv_cache)
                                  if cfg.attention_sinks else
                                  attention(cfg, kernel_symbol("attention", kv_cache), kv_cache=kv_cache)]
    funcs = [
        layernorm(hdim, cfg.norm_eps, K["layernorm"]) if cfg.norm == "layer" else rmsnorm(hdim, cfg.norm_eps, K["rmsnorm"]),
        *attention_kernels,
        trunk_matvec(hdim, cfg.attn_out_dim, K["o_proj"], residual=True),
        matvec(cfg.num_experts, hdim, K["router"]),  # also the next-router and fitted-router predictors
        # the LM head's bias, where it has one, added as the qkv bias is: as the matvec's residual
        trunk_matvec(cfg.vocab_size, hdim, K["lm_head_bias"] if cfg.lm_head_bias else K["lm_head"],
                     residual=cfg.lm_head_bias),
    ]
    if cfg.router_logit_bias:  # added as the matvec's residual
        funcs.append(matvec(cfg.num_experts, hdim, K["router_bias"], residual=True))
    if cfg.encoder_layers:  # cross-attention: the plain attention over the encoder's rows
        funcs += [attention(cfg, K["attention"]), trunk_matvec(cfg.q_dim, hdim, K["cross_q"]),
                  trunk_matvec(2 * cfg.kv_dim, hdim, K["cross_kv"])]
    if cfg.qk_norm != "none":
        funcs.append(qk_norm(cfg, K["qk_norm"]))
    if cfg.o_bias:
        funcs.append(add(hdim, K["add"]))
    if cfg.shared_expert_intermediate:
        funcs += resident_mlp(cfg.shared_expert_intermediate, K["shared_gate_up"], K["shared_down"])
        if cfg.shared_expert_gate:
            funcs.append(matvec(1, hdim, K["shared_gate"]))
    if cfg.dense_intermediate and cfg.dense_layers:
        funcs += resident_mlp(cfg.dense_intermediate, K["dense_up_relu" if relu else "dense_gate_up"], K["dense_down"],
                              relu)
    gate_up_role, down_role = expert_kernel_roles(cfg)
    routed = {} if relu else dict(kind=cfg.expert_activation, bias=cfg.expert_bias)
    for b in sorted(set(expert_bits)):
        names = dict(gate_up=expert_symbol(gate_up_role, b), down=expert_symbol(down_role, b))
        grid = grid_at(b, int4_grid)
        if tiles:
            up = int_dot.expert_up_relu if relu else int_dot.expert_gate_up
            funcs += [tiled(up, cfg, b, group, name=names["gate_up"], grid=grid, **routed),
                      tiled(int_dot.expert_down, cfg, b, group, name=names["down"], bias=cfg.expert_bias, grid=grid)]
        else:
            up = expert_up_relu if relu else expert_gate_up
            funcs += [up(cfg, b, group, name=names["gate_up"], grid=grid, **routed),
                      expert_down(cfg, b, group, name=names["down"], bias=cfg.expert_bias, grid=grid)]
    for f in funcs:
        check_signature(f)
    return {str(f.attrs["global_symbol"]): f for f in funcs}


def batched_kernels(cfg: MoEConfig, expert_bits: list[int], group: int, target: tvm.target.Target,
                    trunk_bits: int = DEFAULT_TRUNK_BITS, int4_grid: str = "half") -> dict[str, tvm.tirx.PrimFunc]:
    """The integer-dot kernels (tiles layout) that take BATCH_ROWS of a prompt's tokens in one call, by
    symbol: the routed experts' and, with a quantized trunk, the attention projections' (not latent
    attention's) and the shared expert's or dense MLP's. Each vector of weight codes is decoded once for
    every row, and every row's output is the same bits as the decode kernel gives it. The hand
    schedule (tuning searches the decode kernels)."""
    from . import int_dot

    isa = int_dot.isa_for(target)
    if isa is None:
        raise ValueError(f"batched kernels need a target with an int8 dot-product instruction; got {target}")
    hdim, K, B = cfg.hidden_size, KERNELS, BATCH_ROWS
    relu = cfg.expert_activation == "relu"
    up = int_dot.expert_up_relu if relu else int_dot.expert_gate_up
    funcs = []
    for b in sorted(set(expert_bits)):  # the routed experts
        gate_up_role, down_role = expert_kernel_roles(cfg)
        routed = {} if relu else dict(kind=cfg.expert_activation, bias=cfg.expert_bias)
        grid = grid_at(b, int4_grid)
        funcs += [up(isa, cfg, b, group, name=expert_symbol(gate_up_role, b, B), grid=grid, batch=B, **routed),
                  int_dot.expert_down(isa, cfg, b, group, name=expert_symbol(down_role, b, B), bias=cfg.expert_bias,
                                      grid=grid, batch=B)]
    if trunk_bits != 32:
        grid, suffix = grid_at(trunk_bits, int4_grid), BATCH_SUFFIX.format(batch=B)
        if cfg.attention != "mla" and cfg.position != "relative":
            qkv = K["qkv_bias"] if cfg.qkv_bias else K["qkv"]
            funcs += [int_dot.matvec(isa, cfg.q_dim + 2 * cfg.kv_dim, hdim, trunk_bits, group, qkv + suffix,
                                     residual=cfg.qkv_bias, grid=grid, batch=B),
                      int_dot.matvec(isa, hdim, cfg.attn_out_dim, trunk_bits, group, K["o_proj"] + suffix,
                                     residual=True, grid=grid, batch=B)]
        mlps = [(cfg.shared_expert_intermediate, K["shared_gate_up"], K["shared_down"], False)] if \
            cfg.shared_expert_intermediate else []
        if cfg.dense_intermediate and cfg.dense_layers:
            mlps.append((cfg.dense_intermediate, K["dense_up_relu" if relu else "dense_gate_up"], K["dense_down"], relu))
        for sdim, gate_up_name, down_name, mlp_relu in mlps:
            funcs += [(int_dot.expert_up_relu if mlp_relu else int_dot.expert_gate_up)(
                          isa, cfg, trunk_bits, group, idim=sdim, name=gate_up_name + suffix, grid=grid, batch=B),
                      int_dot.expert_down(isa, cfg, trunk_bits, group, idim=sdim, name=down_name + suffix, grid=grid,
                                          batch=B)]
    for f in funcs:
        check_signature(f)
    return {str(f.attrs["global_symbol"]): f for f in funcs}
