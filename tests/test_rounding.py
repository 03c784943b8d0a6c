"""Calibrated rounding (GPTQ against the inputs' Gram matrix) and the moments it reads."""
import numpy as np
import pytest

from edgemoe.compiler.profile import expert_moments
from edgemoe.compiler.quantize import compiled_trunk, quantize, quantized_model
from edgemoe.evaluate import perplexity_reference


def correlated_inputs(rng, rows, k):
    """Inputs with a few strong, correlated directions and uneven channel scales, like hidden states."""
    basis = rng.standard_normal((8, k))
    return (rng.standard_normal((rows, 8)) @ basis + 0.3 * rng.standard_normal((rows, k))) * rng.uniform(0.2, 3, k)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_calibrated_rounding_cuts_the_output_error_on_unseen_inputs(bits, rng):
    k = 128
    w = (rng.standard_normal((64, k)) * 0.05).astype(np.float32)
    x = correlated_inputs(rng, 2500, k)
    x_fit, x_new = x[:2000], x[2000:]
    plain = quantize(w, bits, 32)
    fitted = quantize(w, bits, 32, gram=x_fit.T @ x_fit)
    codes = fitted.codes()
    lo, hi = (-127, 127) if bits == 8 else (0, (1 << bits) - 1)
    assert codes.min() >= lo and codes.max() <= hi
    out_err = lambda q: float((((q.dequantize() - w) @ x_new.T) ** 2).sum())
    assert out_err(fitted) < 0.5 * out_err(plain), (out_err(fitted), out_err(plain))


def test_the_compiled_sum_adds_in_numpy_s_order(rng):
    """The compiled scale search compares errors summed as NumPy sums them: any other order
    picks another scale where two candidates' errors differ in the last bit."""
    from edgemoe.compiler.rounding import PAIRWISE_BLOCK, _pairwise_sum

    for n in range(1, PAIRWISE_BLOCK + 1):
        rows = (rng.standard_normal((200, n)) ** 2 * rng.uniform(1e-6, 1e-2, (200, 1))).astype(np.float32)
        assert all(_pairwise_sum(r, 0, n) == r.sum() for r in rows), n


@pytest.mark.parametrize("group", [8, 32, 128, 256])
def test_the_compiled_scale_search_finds_the_array_search_s_scales(group, rng):
    """The unweighted search's compiled loop (every expert without calibration) and the array
    passes (weights of ones take that path) choose the same float16 scales, bit for bit."""
    from edgemoe.compiler.rounding import search_scales

    g = (rng.standard_normal((4000, 2, group)) * 0.02).astype(np.float32)
    g[0, 0], g[1, 1, : group // 2], g[2] = 0, 0, g[2] * 1e3  # an all-zero group, a half-empty one, large values
    for bits, grid in ((2, "half"), (3, "half"), (4, "half"), (4, "integer"), (8, "half")):
        fused, passes = search_scales(g, bits, grid=grid), search_scales(g, bits, np.ones(group, np.float32), grid)
        assert fused.dtype == passes.dtype == np.float32 and np.array_equal(fused, passes), (bits, grid)


@pytest.mark.parametrize("gram", [False, True], ids=["searched", "calibrated"])
def test_int4_on_the_integer_grid_rounds_to_levels_minus_8_to_7(gram, rng):
    """The integer grid (GGUF Q4_0's levels) with searched scales or calibrated rounding: codes 0…15
    stand for -8…7, and the weights are about as close as on the half-integer grid (Gaussian weights,
    60 seeds: RMS error 0.99–1.04× the half grid's, searched and calibrated alike; bound 1.06×)."""
    w = (rng.standard_normal((64, 128)) * 0.05).astype(np.float32)
    x = rng.standard_normal((512, 128)).astype(np.float32)
    h = x.T @ x if gram else None
    half, integer = quantize(w, 4, 32, gram=h), quantize(w, 4, 32, gram=h, grid="integer")
    levels = integer.codes() - 8
    assert levels.min() == -8 and levels.max() == 7
    assert np.array_equal(integer.dequantize(), levels * integer.scales.astype(np.float32).repeat(32, axis=1))
    err = [np.sqrt(((m.dequantize() - w) ** 2).mean()) for m in (half, integer)]
    assert err[1] <= 1.06 * err[0], err
    with pytest.raises(ValueError, match="INT4's"):
        quantize(w, 2, 32, grid="integer")


def test_a_gram_of_zeros_falls_back_to_searched_scales(rng):
    """An expert the calibration text never routed to has no inputs to round against."""
    w = (rng.standard_normal((32, 64)) * 0.05).astype(np.float32)
    a, b = quantize(w, 4, 32), quantize(w, 4, 32, gram=np.zeros((64, 64)))
    assert np.array_equal(a.packed, b.packed) and np.array_equal(a.scales, b.scales)


def test_moments_sum_the_inputs_each_expert_sees(tiny_mixtral_dir):
    from edgemoe.models import load_model
    from edgemoe.models.reference import expert_hidden, forward_sequence

    model = load_model(tiny_mixtral_dir)
    tokens = np.arange(40) % model.config.vocab_size
    mom = expert_moments(model, tokens, window=16)
    trace: dict = {}
    for i in range(0, 40, 16):  # the same windows, summed here by hand for layer 1, expert 2
        t: dict = {}
        sel = forward_sequence(model, tokens[i : i + 16], t)[1]
        rows = (sel[:, 1] == 2).any(axis=1)
        trace.setdefault("x", []).append(t["ffn_in"][1][rows])
    x = np.concatenate(trace["x"])
    h = expert_hidden(model.layers[1].experts[2], x, None)
    assert mom.rows[1, 2] == len(x) and mom.rows.sum() == 40 * model.config.num_layers * model.config.top_k
    assert np.allclose(mom.gate_up[1, 2], x.T @ x, rtol=1e-6, atol=1e-9)
    assert np.allclose(mom.down[1, 2], h.T @ h, rtol=1e-6, atol=1e-9)


def test_calibrated_int2_lowers_held_out_perplexity_of_the_trained_model(trained_model, tokenizer):
    """On the bundled model: rounding against calibration text (part of the training data) helps on
    WikiText-2, which neither saw."""
    from conftest import CALIBRATION, DATA_DIR

    calib = np.asarray(tokenizer.encode(CALIBRATION.read_text()[:24000]).ids[:4096])
    held = np.asarray(tokenizer.encode((DATA_DIR / "wikitext-2-test.txt").read_text()[:12000]).ids[:2048])
    mom = expert_moments(compiled_trunk(trained_model, 8, 32, "tiles"), calib)
    plain = perplexity_reference(quantized_model(trained_model, 2, 8, 32, "tiles"), held)["perplexity"]
    fitted = perplexity_reference(quantized_model(trained_model, 2, 8, 32, "tiles", mom), held)["perplexity"]
    assert fitted < plain * 0.985, (fitted, plain)  # measured 0.965


@pytest.mark.parametrize("bits,qtype", [(8, "Q8_0"), (4, "Q4_0")])
def test_llama_cpp_rounding_is_gguf_pys_block_for_block(bits, qtype, rng):
    """compiler/llamacpp_rounding.py against llama.cpp's own Python quantizer (gguf-py, which its
    converter writes Q8_0 with), on fresh weights with ties made on purpose: a weight at exactly half
    a Q8_0 step (rounded away from zero) and blocks whose extreme is positive (Q4_0's d < 0)."""
    from gguf import GGMLQuantizationType, quantize as gguf_quantize

    from edgemoe.compiler.llamacpp_rounding import round_blocks

    w = (rng.standard_normal((64, 256)) * rng.uniform(0.01, 1, (64, 1))).astype(np.float16).astype(np.float32)
    w[0, :32] = np.arange(32, dtype=np.float32) / 32 - 0.5  # extreme -0.5: Q4_0's d > 0 here, < 0 in row 1
    w[1, :32] = -w[0, :32]
    w[2, :32] = 0.0  # an all-zero block: d = 0, every level 0
    w[3, :32] = 127.0 / 2 * np.sign(rng.standard_normal(32)).astype(np.float32) / 127  # ±0.5 steps at Q8_0
    w[3, 0] = 1.0
    levels, scales = round_blocks(w, bits)
    blocks = np.asarray(gguf_quantize(w, GGMLQuantizationType[qtype])).reshape(-1, 34 if bits == 8 else 18)
    d = blocks[:, :2].copy().view(np.float16).reshape(scales.shape)
    q = blocks[:, 2:]
    want = q.view(np.int8) if bits == 8 else np.concatenate([q & 0x0F, q >> 4], axis=1).astype(np.int8) - 8
    assert np.array_equal(scales.view(np.uint16), d.view(np.uint16))
    assert np.array_equal(levels, want.reshape(levels.shape))
    assert not levels[2, :32].any() and scales[2, 0] == 0
    if bits == 4:
        assert scales[0, 0] > 0 > scales[1, 0] and levels[0, 0] == levels[1, 0] == -8


def test_llama_cpp_rounding_refuses_what_llama_cpp_has_no_blocks_for():
    from edgemoe.compiler.llamacpp_rounding import round_blocks

    with pytest.raises(ValueError, match="INT8 \\(Q8_0\\) and INT4 \\(Q4_0\\), not for INT3"):
        round_blocks(np.zeros((2, 64), np.float32), 3)
    with pytest.raises(ValueError, match="blocks are 32 weights"):
        round_blocks(np.zeros((2, 48), np.float32), 8)
