"""Every TVM-generated decode kernel against NumPy on fresh random inputs (through TVM's own runtime)."""
import numpy as np
import pytest
import tvm

from edgemoe.compiler import kernels
from edgemoe.compiler.schedules import schedule
from edgemoe.compiler.quantize import TILE_ROWS, quantize
from edgemoe.models import MoEConfig
from edgemoe.models.reference import apply_rope, layer_norm, quantize_activation, rms_norm, silu
from edgemoe.targets import load_target

CFG = MoEConfig("mixtral", vocab_size=300, hidden_size=128, num_layers=1, num_heads=8, num_kv_heads=2, head_dim=16,
                num_experts=4, top_k=2, expert_intermediate=96, max_positions=64, rope_theta=10000.0, norm_eps=1e-5)


@pytest.fixture(scope="module", params=["default", 4, 64], ids=lambda p: f"lanes-{p}")
def mod(request):
    """The kernels with the hand default schedule and with the tuner's extreme lane counts."""
    funcs = kernels.decode_kernels(CFG, [2, 3, 4, 8, 16], 32, trunk_bits=32)
    lanes = None if request.param == "default" else {n: request.param for n in funcs}
    return tvm.compile(schedule(tvm.IRModule(funcs), lanes), target=load_target("host").tvm()).mod


def call(mod, name, *inputs, outs):
    args = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in inputs]
    out = [tvm.runtime.tensor(np.zeros(s, np.float32)) for s in outs]
    mod[name](*args, *out)
    return [o.numpy() for o in out]


def rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def f32(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def test_rmsnorm(mod, rng):
    x, w = f32(rng, 128), f32(rng, 128)
    (y,) = call(mod, "em_rmsnorm", x, w, outs=[(128,)])
    assert rel(y, rms_norm(x, w, CFG.norm_eps)) < 1e-5


def test_layernorm(rng):
    """LayerNorm (norm "layer") with weight and bias, on an input far from zero mean."""
    mod = tvm.compile(schedule(tvm.IRModule({"ln": kernels.layernorm(128, 1e-5, "ln")})),
                      target=load_target("host").tvm()).mod
    x, w, b = f32(rng, 128) + 3.0, f32(rng, 128), f32(rng, 128)
    (y,) = call(mod, "ln", x, w, b, outs=[(128,)])
    assert rel(y, layer_norm(x, w, b, 1e-5)) < 1e-5


@pytest.mark.parametrize("name,rows", [("em_qkv", 128 + 2 * 32), ("em_router", 4), ("em_lm_head", 300)])
def test_matvec(mod, rng, name, rows):
    w, x = f32(rng, rows, 128), f32(rng, 128)
    (y,) = call(mod, name, w, x, outs=[(rows,)])
    assert rel(y, w @ x) < 1e-5


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_quantized_trunk_matvec(rng, bits, residual):
    """The trunk's projections at a quantized bitwidth: codes and scales in, dequantized in registers."""
    f = kernels.matvec(192, 128, "qmv", residual=residual, bits=bits, group=32)
    mod = tvm.compile(schedule(tvm.IRModule({"qmv": f})), target=load_target("host").tvm()).mod
    w, x, r = quantize(f32(rng, 192, 128), bits), f32(rng, 128), f32(rng, 192)
    (y,) = call(mod, "qmv", w.packed, w.scales, x, *([r] if residual else []), outs=[(192,)])
    assert rel(y, (r if residual else 0) + w.dequantize() @ x) < 1e-5


def test_o_proj_adds_residual(mod, rng):
    w, x, r = f32(rng, 128, 128), f32(rng, 128), f32(rng, 128)
    (y,) = call(mod, "em_o_proj", w, x, r, outs=[(128,)])
    assert rel(y, r + w @ x) < 1e-5


def test_rope_splits_and_rotates(mod, rng):
    qkv, cos, sin = f32(rng, 128 + 64), f32(rng, 8), f32(rng, 8)
    q, k, v = call(mod, "em_rope", qkv, cos, sin, outs=[(8, 16), (2, 16), (2, 16)])
    assert rel(q, apply_rope(qkv[:128].reshape(8, 16), cos, sin)) < 1e-6
    assert rel(k, apply_rope(qkv[128:160].reshape(2, 16), cos, sin)) < 1e-6
    assert np.array_equal(v, qkv[160:].reshape(2, 16))


@pytest.mark.parametrize("n", [1, 7, 64])
def test_attention_any_length(mod, rng, n):
    q, kc, vc = f32(rng, 8, 16), f32(rng, n, 2, 16), f32(rng, n, 2, 16)
    (o,) = call(mod, "em_attention", q, kc, vc, outs=[(8, 16)])
    assert rel(o, _attention_reference(q, kc, vc, 1 / 4.0)) < 1e-5


def _attention_reference(q, kc, vc, scale, bias=None, sink=None):
    heads, group = q.shape[0], q.shape[0] // kc.shape[1]
    ref = np.empty_like(q)
    for h in range(heads):
        s = kc[:, h // group] @ q[h] * scale + (0 if bias is None else bias[h])
        m = s.max() if sink is None else max(s.max(), sink[h])
        p = np.exp(s - m)
        z = p.sum() + (0 if sink is None else np.exp(sink[h] - m))
        ref[h] = p / z @ vc[:, h // group]
    return ref


# 8 heads × 128 dims: 8 KiB of keys and values per cache position, where the schedule splits the heads
# over the threads (TVM's own pool here; the runtime's in test_runtime.py)
WIDE = MoEConfig("mixtral", vocab_size=300, hidden_size=1024, num_layers=1, num_heads=8, num_kv_heads=2, head_dim=128,
                 num_experts=4, top_k=2, expert_intermediate=96, max_positions=64, rope_theta=10000.0, norm_eps=1e-5)


@pytest.mark.parametrize("variant", ["plain", "sinks", "position_bias"])
def test_attention_split_over_heads(rng, variant):
    from edgemoe.compiler.schedules import ATTENTION_PARALLEL_MIN_ROW_BYTES

    assert WIDE.num_heads * WIDE.head_dim * 8 >= ATTENTION_PARALLEL_MIN_ROW_BYTES  # the split applies
    func = kernels.attention(WIDE, sinks=variant == "sinks", position_bias=variant == "position_bias")
    scheduled = schedule(tvm.IRModule({"em_attention": func}))
    assert "parallel" in scheduled.script()
    mod = tvm.compile(scheduled, target=load_target("host").tvm()).mod
    for n in (1, 5, 64):
        q, kc, vc = f32(rng, 8, 128), f32(rng, n, 2, 128), f32(rng, n, 2, 128)
        extra = {"position_bias": {"bias": f32(rng, 8, n)}, "sinks": {"sink": f32(rng, 8)}}.get(variant, {})
        (o,) = call(mod, "em_attention", q, kc, vc, *extra.values(), outs=[(8, 128)])
        assert rel(o, _attention_reference(q, kc, vc, 128 ** -0.5, **extra)) < 1e-5


def weight_args(q):
    """A weight's kernel parameters: codes and scales, or the float16 weights alone."""
    return [q.packed] if q.bits == 16 else [q.packed, q.scales]


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 16])
def test_expert_kernels_fuse_dequantization(mod, rng, bits):
    g, u = (quantize(f32(rng, 96, 128) * 0.05, bits) for _ in range(2))
    d = quantize(f32(rng, 128, 96) * 0.05, bits)
    x, res = f32(rng, 128), f32(rng, 128)
    (h,) = call(mod, f"em_expert_gate_up_w{bits}", x, *weight_args(g), *weight_args(u), outs=[(96,)])
    h_ref = silu(g.dequantize() @ x) * (u.dequantize() @ x)
    assert rel(h, h_ref) < 1e-5
    (y,) = call(mod, f"em_expert_down_w{bits}", h_ref, *weight_args(d), res, np.array([0.375], np.float32),
                outs=[(128,)])
    assert rel(y, res + 0.375 * (d.dequantize() @ h_ref)) < 1e-5


def runs_here(target) -> bool:
    """Whether code built for `target` (an x86 TargetDesc) runs on this CPU."""
    from edgemoe.compiler import int_dot
    from tvm.target import codegen

    isa = int_dot.isa_for(target.tvm())
    host = load_target("host").tvm()
    return isa is not None and isa.arch == "x86_64" and bool(codegen.target_has_features(isa.feature, host))


@pytest.fixture(scope="module", params=["host", "x86-avx2"])
def int_dot_mod(request):
    """The integer-dot kernels for this CPU's instruction, and for AVX2 (the x86 fallback without VNNI)."""
    target = load_target(request.param)
    if not runs_here(target):
        pytest.skip(f"integer-dot kernels for {request.param} cannot run on this CPU")
    funcs = kernels.decode_kernels(CFG_TILES, [2, 3, 4, 8], 32, trunk_bits=8, layout="tiles", target=target.tvm())
    funcs.update(kernels.batched_kernels(CFG_TILES, [2, 3, 4, 8], 32, target.tvm(), trunk_bits=8))
    return tvm.compile(schedule(tvm.IRModule(funcs)), target=target.tvm()).mod


# rows of every matrix a multiple of 16 (the tiles layout)
CFG_TILES = MoEConfig("mixtral", vocab_size=320, hidden_size=128, num_layers=1, num_heads=8, num_kv_heads=2,
                      head_dim=16, num_experts=4, top_k=2, expert_intermediate=96, max_positions=64,
                      rope_theta=10000.0, norm_eps=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_int_dot_expert_kernels(int_dot_mod, rng, bits):
    """Against NumPy on the same codes with the input rounded to int8 as the kernel does: equal up
    to float summation order."""
    g, u = (quantize(f32(rng, 96, 128) * 0.05, bits, layout="tiles") for _ in range(2))
    d = quantize(f32(rng, 128, 96) * 0.05, bits, layout="tiles")
    x, res = f32(rng, 128), f32(rng, 128)
    (h,) = call(int_dot_mod, f"em_expert_gate_up_w{bits}", x, g.packed, g.scales, u.packed, u.scales, outs=[(96,)])
    xa = quantize_activation(x, 32)
    h_ref = silu(g.dequantize() @ xa) * (u.dequantize() @ xa)
    assert rel(h, h_ref) < 1e-5
    (y,) = call(int_dot_mod, f"em_expert_down_w{bits}", h_ref, d.packed, d.scales, res, np.array([0.375], np.float32),
                outs=[(128,)])
    assert rel(y, res + 0.375 * (d.dequantize() @ quantize_activation(h_ref, 32))) < 1e-5
    # and within int8 input rounding of the unrounded product
    assert rel(h, silu(g.dequantize() @ x) * (u.dequantize() @ x)) < 0.05


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_batched_kernels_give_every_row_the_decode_kernels_bits(int_dot_mod, rng, bits):
    """BATCH_ROWS rows through the batched kernels: each row's output is the very bits the one-token
    kernel gives it (prefill.c's logits do not depend on how a prompt is batched)."""
    from edgemoe.compiler.program import BATCH_ROWS

    g, u = (quantize(f32(rng, 96, 128) * 0.05, bits, layout="tiles") for _ in range(2))
    d = quantize(f32(rng, 128, 96) * 0.05, bits, layout="tiles")
    x, res, w = f32(rng, BATCH_ROWS, 128), f32(rng, BATCH_ROWS, 128), rng.uniform(0.1, 1, BATCH_ROWS).astype(np.float32)
    x[1] *= 40  # rows of different scales: each is quantized on its own
    (h,) = call(int_dot_mod, f"em_expert_gate_up_w{bits}_b{BATCH_ROWS}", x, g.packed, g.scales, u.packed, u.scales,
                outs=[(BATCH_ROWS, 96)])
    (y,) = call(int_dot_mod, f"em_expert_down_w{bits}_b{BATCH_ROWS}", h, d.packed, d.scales, res, w,
                outs=[(BATCH_ROWS, 128)])
    for m in range(BATCH_ROWS):
        (h1,) = call(int_dot_mod, f"em_expert_gate_up_w{bits}", x[m], g.packed, g.scales, u.packed, u.scales,
                     outs=[(96,)])
        (y1,) = call(int_dot_mod, f"em_expert_down_w{bits}", h1, d.packed, d.scales, res[m], w[m:m + 1], outs=[(128,)])
        assert np.array_equal(h[m], h1) and np.array_equal(y[m], y1), f"row {m}"


@pytest.mark.parametrize("name,rows,residual", [("em_qkv", 128 + 2 * 32, False), ("em_o_proj", 128, True)])
def test_batched_trunk_matvec_gives_every_row_the_decode_kernels_bits(int_dot_mod, rng, name, rows, residual):
    from edgemoe.compiler.program import BATCH_ROWS

    w = quantize(f32(rng, rows, 128) * 0.05, 8, layout="tiles")
    x, res = f32(rng, BATCH_ROWS, 128), f32(rng, BATCH_ROWS, rows)
    x[2] *= 1e-3
    (y,) = call(int_dot_mod, f"{name}_b{BATCH_ROWS}", w.packed, w.scales, x, *([res] if residual else []),
                outs=[(BATCH_ROWS, rows)])
    for m in range(BATCH_ROWS):
        (y1,) = call(int_dot_mod, name, w.packed, w.scales, x[m], *([res[m]] if residual else []), outs=[(rows,)])
        assert np.array_equal(y[m], y1), f"row {m}"


@pytest.mark.parametrize("variant", ["relu", "clamped_swiglu"])
def test_batched_kernels_of_relu_and_biased_experts(rng, variant):
    """The batched forms of Switch Transformers' ReLU experts and GPT-OSS's clamped SwiGLU with biases:
    every row the one-token kernels' bits."""
    from dataclasses import replace

    from edgemoe.compiler.program import BATCH_ROWS, expert_kernel_roles

    target = load_target("host")
    if not runs_here(target):
        pytest.skip("no integer-dot kernels for this CPU")
    cfg = replace(CFG_TILES, expert_activation="relu") if variant == "relu" else \
        replace(CFG_TILES, expert_activation="clamped_swiglu", expert_bias=True, swiglu_alpha=1.702, swiglu_limit=7.0)
    funcs = {**kernels.decode_kernels(cfg, [4], 32, trunk_bits=8, layout="tiles", target=target.tvm()),
             **kernels.batched_kernels(cfg, [4], 32, target.tvm(), trunk_bits=8)}
    up_name, down_name = (kernels.expert_symbol(role, 4) for role in expert_kernel_roles(cfg))
    funcs = {n: f for n, f in funcs.items() if n.startswith((up_name, down_name))}
    mod = tvm.compile(schedule(tvm.IRModule(funcs)), target=target.tvm()).mod
    g, u = (quantize(f32(rng, 96, 128) * 0.05, 4, layout="tiles") for _ in range(2))
    d = quantize(f32(rng, 128, 96) * 0.05, 4, layout="tiles")
    mats = [u.packed, u.scales] if variant == "relu" else [g.packed, g.scales, u.packed, u.scales, f32(rng, 96),
                                                          f32(rng, 96)]
    down_bias = [] if variant == "relu" else [f32(rng, 128)]
    x, res, w = f32(rng, BATCH_ROWS, 128), f32(rng, BATCH_ROWS, 128), rng.uniform(0.1, 1, BATCH_ROWS).astype(np.float32)
    (h,) = call(mod, f"{up_name}_b{BATCH_ROWS}", x, *mats, outs=[(BATCH_ROWS, 96)])
    (y,) = call(mod, f"{down_name}_b{BATCH_ROWS}", h, d.packed, d.scales, *down_bias, res, w,
                outs=[(BATCH_ROWS, 128)])
    for m in range(BATCH_ROWS):
        (h1,) = call(mod, up_name, x[m], *mats, outs=[(96,)])
        (y1,) = call(mod, down_name, h1, d.packed, d.scales, *down_bias, res[m], w[m:m + 1], outs=[(128,)])
        assert np.array_equal(h[m], h1) and np.array_equal(y[m], y1), f"row {m}"


@pytest.mark.parametrize("target_name,layout", [("host", "rows"), ("host", "tiles"), ("x86-avx2", "tiles")])
def test_int4_kernels_on_the_integer_grid(rng, target_name, layout):
    """INT4 on the integer grid (GGUF Q4_0's levels -8…7: the code for zero is 8, not 7.5), with
    codes at both ends of it: the float and integer-dot expert and trunk kernels against NumPy."""
    from edgemoe.compiler import int_dot

    target = load_target(target_name)
    if layout == "tiles" and not runs_here(target):
        pytest.skip(f"integer-dot kernels for {target_name} cannot run on this CPU")
    cfg = CFG_TILES
    if layout == "tiles":
        isa = int_dot.isa_for(target.tvm())
        funcs = [int_dot.expert_gate_up(isa, cfg, 4, 32, grid="integer"), int_dot.expert_down(isa, cfg, 4, 32, grid="integer"),
                 int_dot.matvec(isa, 48, 128, 4, 32, "em_o_proj", residual=True, grid="integer")]
    else:
        funcs = [kernels.expert_gate_up(cfg, 4, 32, grid="integer"), kernels.expert_down(cfg, 4, 32, grid="integer"),
                 kernels.matvec(48, 128, "em_o_proj", residual=True, bits=4, grid="integer")]
    mod = tvm.compile(schedule(tvm.IRModule({str(f.attrs["global_symbol"]): f for f in funcs})), target=target.tvm()).mod
    g, u = (quantize(f32(rng, 96, 128) * 0.05, 4, layout=layout, grid="integer") for _ in range(2))
    d = quantize(f32(rng, 128, 96) * 0.05, 4, layout=layout, grid="integer")
    for m in (g, u, d):
        assert m.codes().min() == 0 and m.codes().max() == 15  # levels -8 and 7 both used
    x, res = f32(rng, 128), f32(rng, 128)
    xa = quantize_activation(x, 32) if layout == "tiles" else x
    (h,) = call(mod, "em_expert_gate_up_w4", x, g.packed, g.scales, u.packed, u.scales, outs=[(96,)])
    h_ref = silu(g.dequantize() @ xa) * (u.dequantize() @ xa)
    assert rel(h, h_ref) < 1e-5
    (y,) = call(mod, "em_expert_down_w4", h_ref, d.packed, d.scales, res, np.array([0.375], np.float32), outs=[(128,)])
    ha = quantize_activation(h_ref, 32) if layout == "tiles" else h_ref
    assert rel(y, res + 0.375 * (d.dequantize() @ ha)) < 1e-5
    w, r = quantize(f32(rng, 48, 128) * 0.05, 4, layout=layout, grid="integer"), f32(rng, 48)
    (y,) = call(mod, "em_o_proj", w.packed, w.scales, x, r, outs=[(48,)])
    assert rel(y, r + w.dequantize() @ xa) < 1e-5


@pytest.mark.parametrize("name,rows,residual", [("em_qkv", 128 + 2 * 32, False), ("em_o_proj", 128, True),
                                                ("em_lm_head", 320, False)])
def test_int_dot_trunk_matvec(int_dot_mod, rng, name, rows, residual):
    w, x, r = quantize(f32(rng, rows, 128), 8, layout="tiles"), f32(rng, 128), f32(rng, rows)
    (y,) = call(int_dot_mod, name, w.packed, w.scales, x, *([r] if residual else []), outs=[(rows,)])
    assert rel(y, (r if residual else 0) + w.dequantize() @ quantize_activation(x, 32)) < 1e-5


def test_tiles_layout_holds_the_same_weights(rng):
    for bits in (2, 3, 4, 8):
        w = f32(rng, 48, 64)
        assert np.array_equal(quantize(w, bits).dequantize(), quantize(w, bits, layout="tiles").dequantize())
    with pytest.raises(ValueError, match="tiles layout"):
        quantize(f32(rng, 40, 64), 4, layout="tiles")


def test_every_kernel_role_has_a_signature_the_c_side_indexes():
    from edgemoe.compiler import program

    roles = set(program.KERNELS) | set(program.EXPERT_KERNELS)
    assert roles == set(program.KERNEL_SIGNATURES)
    assert set(program.KERNEL_SIGNATURES.values()) <= set(program.SIGNATURES)
    header = program.c_header()
    for sig, params in program.SIGNATURES.items():
        for i, p in enumerate(params):
            assert f"#define EM_SIG_{sig.upper()}_{p.lstrip('*').upper()} {i}\n" in header


def test_a_kernel_whose_parameters_differ_from_its_signature_is_refused():
    from tvm import te

    h = CFG.hidden_size
    x, w = te.placeholder((h,), "float32", name="x"), te.placeholder((h,), "float32", name="w")
    y = te.compute((h,), lambda i: x[i] * w[i], name="y")
    kernels.check_signature(te.create_prim_func([x, w, y]).with_attr("global_symbol", "em_rmsnorm"))
    swapped = te.create_prim_func([w, x, y]).with_attr("global_symbol", "em_rmsnorm")
    with pytest.raises(ValueError, match="em_rmsnorm: parameter 0 is .*'w'.* says float32 'x'"):
        kernels.check_signature(swapped)
    doubled = te.compute((h,), lambda i: x[i] * 2.0, name="y")
    short = te.create_prim_func([x, doubled]).with_attr("global_symbol", "em_rmsnorm")
    with pytest.raises(ValueError, match="parameter 1 is .*'y'.* says float32 'w'"):
        kernels.check_signature(short)
    codes = te.placeholder((h, h // 8), "uint32", name="w_q")
    unscaled = te.compute((h,), lambda i: x[i] * codes[i, 0].astype("float32"), name="y")
    with pytest.raises(ValueError, match="codes without float16 scales"):
        kernels.check_signature(te.create_prim_func([codes, x, unscaled]).with_attr("global_symbol", "em_router"))


MLA = MoEConfig("deepseekv3", vocab_size=300, hidden_size=128, num_layers=1, num_heads=4, num_kv_heads=4, head_dim=16,
                num_experts=4, top_k=2, expert_intermediate=96, max_positions=64, rope_theta=10000.0, norm_eps=1e-5,
                attention="mla", q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=24, v_head_dim=16,
                attention_scale=0.3)


@pytest.fixture(scope="module")
def mla_mod():
    funcs = kernels.decode_kernels(MLA, [4], 32, trunk_bits=32)
    return tvm.compile(schedule(tvm.IRModule(funcs)), target=load_target("host").tvm()).mod


@pytest.mark.parametrize("n", [1, 9, 64])
def test_mla_kernels_are_the_expanded_attention(mla_mod, rng, n):
    """The absorbed latent attention (RoPE, fold wkv_b's key half into the query, attend over latents
    and rotated keys, wkv_b's value half after) against attention over keys and values expanded
    from the latents, as the reference computes it."""
    h, d, nope, v, r = 4, 16, 24, 16, 32
    q, kr = f32(rng, h * (nope + d)), f32(rng, d)
    cos, sin = f32(rng, d // 2), f32(rng, d // 2)
    wkv_b, latent, keys = f32(rng, h * (nope + v), r), f32(rng, n, r), f32(rng, n, d)
    q_rot, k_rot = call(mla_mod, "em_mla_rope", q, kr, cos, sin, outs=[(h, d), (d,)])
    qh = q.reshape(h, nope + d)
    assert rel(q_rot, apply_rope(qh[:, nope:], cos, sin)) < 1e-5 and rel(k_rot, apply_rope(kr, cos, sin)) < 1e-5
    (q_lat,) = call(mla_mod, "em_mla_absorb", q, wkv_b, outs=[(h, r)])
    (o_lat,) = call(mla_mod, "em_mla_attention", q_lat, q_rot, latent, keys, outs=[(h, r)])
    (att,) = call(mla_mod, "em_mla_v", o_lat, wkv_b, outs=[(h * v,)])
    kv = (latent @ wkv_b.T).reshape(n, h, nope + v)
    s = (np.einsum("hd,uhd->hu", qh[:, :nope], kv[..., :nope]) + np.einsum("hd,ud->hu", q_rot, keys)) * 0.3
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    want = np.einsum("hu,uhd->hd", p / p.sum(axis=-1, keepdims=True), kv[..., nope:]).reshape(-1)
    assert rel(att, want) < 1e-5


def test_mla_projections_and_norms(mla_mod, rng):
    x, wq_a, wq, wkv_a = f32(rng, 128), f32(rng, 64, 128), f32(rng, 4 * 40, 64), f32(rng, 48, 128)
    wn, kn = f32(rng, 64), f32(rng, 32)
    (qa,) = call(mla_mod, "em_mla_q_a", wq_a, x, outs=[(64,)])
    (qn,) = call(mla_mod, "em_mla_q_a_norm", qa, wn, outs=[(64,)])
    (q,) = call(mla_mod, "em_mla_q", wq, qn, outs=[(160,)])
    assert rel(q, wq @ rms_norm(wq_a @ x, wn, 1e-6)) < 1e-5
    (ckv,) = call(mla_mod, "em_mla_kv_a", wkv_a, x, outs=[(48,)])
    (lat,) = call(mla_mod, "em_mla_kv_norm", ckv[:32].copy(), kn, outs=[(32,)])
    assert rel(lat, rms_norm((wkv_a @ x)[:32], kn, 1e-6)) < 1e-5


# 8 tiles of rows and 4 groups each way: every value of every integer-dot knob fits
CFG_KNOBS = MoEConfig("mixtral", vocab_size=128, hidden_size=128, num_layers=1, num_heads=8, num_kv_heads=2,
                      head_dim=16, num_experts=4, top_k=2, expert_intermediate=128, max_positions=64,
                      rope_theta=10000.0, norm_eps=1e-5)


@pytest.mark.parametrize("scope", ["short", pytest.param("every", marks=pytest.mark.slow)])
@pytest.mark.parametrize("target_name", ["host", "x86-avx2"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_every_int_dot_schedule_the_search_can_pick_matches_numpy(rng, target_name, bits, scope):
    """The hand schedule, the schedules one knob away from it (each value of each knob in the
    tuner's space) and one with every knob off its hand value, for gate_up and down: all equal to
    NumPy (up to float summation order) on the same random inputs. The short form builds the
    one-knob schedules of gate_up alone (down runs the same group loop), and for AVX2 only those of
    the knob its code alone has (vectors per group step); "every" builds them all."""
    from dataclasses import asdict

    from edgemoe.compiler import int_dot
    from edgemoe.compiler.tuning import INT_DOT_SPACE, label

    target = load_target(target_name)
    if not runs_here(target):
        pytest.skip(f"integer-dot kernels for {target_name} cannot run on this CPU")
    isa = int_dot.isa_for(target.tvm())
    hand = asdict(int_dot.Knobs().resolved(isa, 128, 128, bits, 32))
    knobs = INT_DOT_SPACE if scope == "every" or target_name == "host" else {"vectors": INT_DOT_SPACE["vectors"]}
    one_away = [{**hand, k: v} for k, values in knobs.items() for v in values if v != hand[k]]
    every_knob = dict(chains=4, tiles=2, vectors=TILE_ROWS // isa.lanes, unroll=2, fuse=True, prefetch=8,
                      parallel=not hand["parallel"])
    schedules = {"gate_up": [hand, *one_away, every_knob],
                 "down": [hand, *(one_away if scope == "every" else []), {**every_knob, "fuse": False}]}
    builders = {"gate_up": int_dot.expert_gate_up, "down": int_dot.expert_down}
    funcs = {}
    for kernel, build in builders.items():
        for s in schedules[kernel]:
            name = f"em_expert_{kernel}_w{bits}__" + label(s).replace("=", "").replace(",", "_")
            try:
                funcs[name] = build(isa, CFG_KNOBS, bits, 32, int_dot.Knobs(**s), name=name)
            except ValueError:  # knobs this kernel cannot take (vectors beyond a tile, fusing in down)
                assert s["fuse"] and kernel == "down" or s["vectors"] > TILE_ROWS // isa.lanes, s
    assert len(funcs) >= 4
    mod = tvm.compile(tvm.IRModule(funcs), target=target.tvm()).mod
    g, u, d = (quantize(f32(rng, 128, 128) * 0.05, bits, layout="tiles") for _ in range(3))
    x, res = f32(rng, 128), f32(rng, 128)
    xa = quantize_activation(x, 32)
    h_ref = silu(g.dequantize() @ xa) * (u.dequantize() @ xa)
    y_ref = res + 0.375 * (d.dequantize() @ quantize_activation(h_ref, 32))
    for name in funcs:
        if "gate_up" in name:
            (h,) = call(mod, name, x, g.packed, g.scales, u.packed, u.scales, outs=[(128,)])
            assert rel(h, h_ref) < 1e-5, name
        else:
            (y,) = call(mod, name, h_ref, d.packed, d.scales, res, np.array([0.375], np.float32), outs=[(128,)])
            assert rel(y, y_ref) < 1e-5, name


def test_a_kernel_built_again_with_the_same_arguments_is_the_one_built_before():
    """int_dot's builders keep what they built: the same arguments give the very same PrimFunc (no
    second TVMScript parse), and any argument that differs gives its own kernel."""
    from edgemoe.compiler import int_dot

    isa = int_dot.isa_for(load_target("x86-avx2").tvm())
    first = int_dot.matvec(isa, 64, 128, 4, 32, name="em_memo_probe")
    assert int_dot.matvec(isa, 64, 128, 4, 32, name="em_memo_probe") is first
    others = [int_dot.matvec(isa, 64, 128, 4, 32, name="em_memo_probe", residual=True),
              int_dot.matvec(isa, 64, 128, 8, 32, name="em_memo_probe"),
              int_dot.matvec(isa, 64, 128, 4, 32, name="em_memo_probe2"),
              int_dot.matvec(isa, 64, 128, 4, 32, name="em_memo_probe", knobs=int_dot.Knobs(chains=4))]
    assert all(o is not first for o in others)
    assert len(others[0].params) == len(first.params) + 1  # the residual
    assert int_dot.knobs_of(others[3]).chains == 4 and int_dot.knobs_of(first).chains != 4
    assert str(others[2].attrs["global_symbol"]) == "em_memo_probe2"
    expert = int_dot.expert_down(isa, CFG_KNOBS, 4, 32, name="em_memo_down")
    assert int_dot.expert_down(isa, CFG_KNOBS, 4, 32, name="em_memo_down") is expert
