"""Per-expert bit plans: the search honours the tolerance on tokens it never saw, image sizes."""
from __future__ import annotations

import numpy as np
import pytest

from edgemoe.compiler.bitplan import (LEVELS, PlanEvaluator, ToleranceError, plan_path, search_plan,
                                      sensitivities, sensitivity_method, split_tokens, uniform)
from edgemoe.compiler.expert_image import ExpertWeights, image_bytes, record_length, write_image
from edgemoe.compiler.expert_pool import ExpertPool
from edgemoe.compiler.plan_pass import estimate_errors, plan_nlls, relative_loss, search_plan_estimated
from edgemoe.compiler.quantize import compiled_trunk, quantize
from edgemoe.models.reference import ReferenceExecutor


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory):
    """A random Mixtral with weights large enough that its experts shape its predictions."""
    import torch
    import transformers

    cfg = transformers.MixtralConfig(
        vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=1024,
        initializer_range=0.2, tie_word_embeddings=False)
    torch.manual_seed(7)
    out = tmp_path_factory.mktemp("sharp_mixtral")
    transformers.MixtralForCausalLM(cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def small_model(small_model_dir):
    from edgemoe.models import load_model

    return load_model(small_model_dir)


@pytest.fixture(scope="module")
def text_tokens(small_model):
    """Text sampled from the float model itself: any change to the model raises the loss on it in
    expectation (cross-entropy ≥ entropy), so losses measure the damage quantization does. Seeded:
    INT8's true loss is so small that some samples of this length would show it negative."""
    rng = np.random.default_rng(1234)
    ex, tokens = ReferenceExecutor(small_model), [0]
    for _ in range(767):
        logits = ex.step(tokens[-1])
        p = np.exp(logits - logits.max())
        tokens.append(int(rng.choice(len(p), p=p / p.sum())))
    return np.asarray(tokens)


def test_emitted_plan_stays_within_tolerance_on_check_tokens(small_model, text_tokens, tmp_path):
    search, check = text_tokens[:512], text_tokens[512:]
    ev = PlanEvaluator(small_model, search)
    int4, int2 = ev.loss(uniform(small_model, 4)), ev.loss(uniform(small_model, 2))
    assert 0 < int4 < int2
    tolerance = (int4 * int2) ** 0.5  # INT4 fits, INT2 does not: the plan must mix levels
    found = search_plan(small_model, search, check, tolerance, cache_dir=tmp_path, log=lambda m: None)
    assert {b for row in found.plan for b in row} <= set(LEVELS)
    assert found.check_loss == pytest.approx(PlanEvaluator(small_model, check).loss(found.plan), rel=1e-9)
    assert found.met and found.check_loss <= tolerance, found.steps
    assert 2 < found.average_bits < 4, found.steps
    assert list(tmp_path.glob("sensitivity-*.json")), "sensitivities are cached on disk"


def test_a_bits_target_is_met_and_a_looser_one_loses_no_more(small_model, text_tokens, tmp_path):
    search, check = text_tokens[:512], text_tokens[512:]
    tight = search_plan(small_model, search, check, max_bits=2.5, cache_dir=tmp_path, log=lambda m: None)
    loose = search_plan(small_model, search, check, max_bits=3.5, cache_dir=tmp_path, log=lambda m: None)
    for found, target in ((tight, 2.5), (loose, 3.5)):
        assert found.met and target - 0.5 < found.average_bits <= target, found.steps
    assert loose.search_loss < tight.search_loss
    with pytest.raises(ValueError, match="below the narrowest"):
        search_plan(small_model, search, check, max_bits=1.5, log=lambda m: None)


def test_check_tokens_are_unseen_by_the_rounding_and_the_search():
    calib, other = np.arange(8), np.arange(100, 108)
    fit, search, check = split_tokens(calib)
    assert list(fit) == list(search) == list(range(6)) and list(check) == [6, 7]
    fit, search, check = split_tokens(calib, other)
    assert list(fit) == list(calib) and list(search) == list(range(100, 106)) and list(check) == [106, 107]


def test_plan_path_follows_each_experts_lower_hull():
    """Two experts, sensitivities from INT4: expert 0 gains from INT8 and INT3 costs little, so it
    starts at INT8 and its cheapest bits go first; expert 1's INT3 point lies above its hull
    (INT4 → INT2 costs less per bit), so it skips INT3."""
    sens = {8: np.array([[-0.04, 0.0]]), 3: np.array([[0.015, 0.05]]), 2: np.array([[0.05, 0.06]])}
    start, moves = plan_path(sens)
    assert start == [[8, 4]]
    # expert 0: 8→4 costs 0.04/4 = 0.01 per bit (8→3 0.011), 4→3 0.015, 3→2 0.035; expert 1: 4→2 0.03
    assert [(l, e, b) for _, l, e, b in moves] == [(0, 0, 4), (0, 0, 3), (0, 1, 2), (0, 0, 2)]
    assert [round(s, 6) for s, *_ in moves] == [0.01, 0.015, 0.03, 0.035]


def test_a_tolerance_no_bitwidth_meets_is_refused_with_the_gap(small_model, text_tokens):
    tokens = text_tokens
    int8 = PlanEvaluator(small_model, tokens).loss(uniform(small_model, 8))
    assert int8 > 0
    with pytest.raises(ToleranceError, match="over the tolerance"):
        search_plan(small_model, tokens, tokens, int8 / 2, log=lambda m: None)


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 16])
def test_image_size_formula_matches_the_written_image(bits, rng, tmp_path):
    hidden, inter, group = 64, 96, 32

    def q(rows, cols):
        return quantize(rng.standard_normal((rows, cols)).astype(np.float32), bits, group)

    experts = [[ExpertWeights(q(inter, hidden), q(inter, hidden), q(hidden, inter)) for _ in range(3)]]
    records = write_image(tmp_path / "e.bin", experts, hidden, inter, group)
    assert all(r.length == record_length(hidden, inter, bits, group) for r in records)
    assert (tmp_path / "e.bin").stat().st_size == image_bytes([[bits] * 3], hidden, inter, group)


def test_loss_from_a_layer_equals_the_whole_run(small_model, text_tokens):
    """Sensitivities reuse the base plan's layer inputs below the changed layer: same value."""
    ev = PlanEvaluator(small_model, text_tokens[:300])
    base = uniform(small_model, 4)
    inputs = ev.layer_inputs(base)
    for layer in range(small_model.config.num_layers):
        plan = [row[:] for row in base]
        plan[layer][1] = 2
        assert ev.loss_from(plan, layer, inputs) == ev.loss(plan)


def test_compile_with_a_bits_target_and_a_search_text(tiny_with_tokenizer, tmp_path):
    import json

    from edgemoe.compiler.driver import CompileOptions, compile_model
    from edgemoe.compiler.expert_image import read_table

    from conftest import CALIBRATION, TRAINED_MODEL

    search = TRAINED_MODEL / "search.txt"
    opts = CompileOptions(calibration=CALIBRATION, calibration_tokens=600, max_bits=3.0, search_text=search,
                          max_seq=64)
    lines = []
    compile_model(tiny_with_tokenizer, tmp_path, opts, log=lines.append)
    m = json.loads((tmp_path / "manifest.json").read_text())
    plan = m["quantization"]["bit_plan"]
    assert m["quantization"]["average_bits"] == np.mean(plan) <= 3.0
    assert m["bit_plan_search"]["text"] == str(search) and m["bit_plan_search"]["max_bits"] == 3.0
    assert [r.bits for r in read_table(tmp_path / "experts.bin")[1]] == [b for row in plan for b in row]
    assert any("check tokens of" in line and "search.txt" in line for line in lines)
    with pytest.raises(ValueError, match="--calibration"):
        compile_model(tiny_with_tokenizer, tmp_path / "x", CompileOptions(max_bits=3.0), log=lambda m: None)


def test_streamed_plan_scores_equal_whole_model_passes(small_model, text_tokens):
    """plan_nlls scores every plan in one layer-by-layer pass; each stream computes what a whole
    forward pass of that plan's model computes (experts rounded without calibration in both)."""
    search, check = text_tokens[:400], text_tokens[400:640]
    mixed = np.random.default_rng(5).choice(LEVELS, size=(2, 4)).tolist()
    with ExpertPool(1) as pool:
        nll = plan_nlls(small_model, compiled_trunk(small_model), [None, mixed, uniform(small_model, 2)],
                        [search, check], 32, pool)
    for row, plan in ((1, mixed), (2, uniform(small_model, 2))):
        for col, tokens in ((0, search), (1, check)):
            want = PlanEvaluator(small_model, tokens).loss(plan)
            assert relative_loss(nll[row, col], nll[0, col]) == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_estimated_errors_grow_as_bits_shrink_and_rank_experts_as_measured(small_model, text_tokens, tmp_path):
    from scipy.stats import spearmanr

    with ExpertPool(1) as pool:
        errors = estimate_errors(compiled_trunk(small_model), text_tokens[:512], LEVELS, 32, pool)
    assert (errors[2] > errors[3]).all() and (errors[3] > errors[4]).all() and (errors[4] > errors[8]).all()
    measured = sensitivities(PlanEvaluator(small_model, text_tokens[:512]), tmp_path)
    # INT2 is where the measured loss rises well above noise, so there the two rankings can be compared
    assert spearmanr((errors[2] - errors[4]).ravel(), measured[2].ravel())[0] > 0.5


def test_estimated_search_stays_within_tolerance_and_streams_the_same(small_model, small_model_dir, text_tokens):
    from edgemoe.models import load_model

    fit, search, check = text_tokens[:256], text_tokens[256:512], text_tokens[512:]
    tolerance = PlanEvaluator(small_model, search).loss(uniform(small_model, 2)) / 4  # INT2 throughout loses 4x this
    found = []
    for model in (small_model, load_model(small_model_dir, lazy=True)):  # in RAM, and read layer by layer
        with ExpertPool(1) as pool:
            found.append(search_plan_estimated(model, compiled_trunk(model), fit, search, check, tolerance, None, 32,
                                               pool, log=lambda m: None))
    assert found[0].plan == found[1].plan and found[0].check_loss == found[1].check_loss
    plan = found[0]
    assert plan.met and plan.check_loss <= tolerance and plan.search_loss <= tolerance, plan.steps
    assert len({b for row in plan.plan for b in row}) > 1 and 2 < plan.average_bits < 8, plan.steps
    assert plan.check_loss == pytest.approx(PlanEvaluator(small_model, check).loss(plan.plan), rel=1e-4)
    with pytest.raises(ToleranceError, match="over the tolerance"):
        search_plan_estimated(small_model, compiled_trunk(small_model), fit, search, check,
                              PlanEvaluator(small_model, search).loss(uniform(small_model, 8)) / 2, None, 32,
                              pool, log=lambda m: None)


def test_sensitivity_is_measured_on_small_models_and_estimated_on_large_ones(small_model):
    from dataclasses import replace

    cfg = small_model.config
    assert sensitivity_method(cfg) == "measured" and sensitivity_method(cfg, "estimated") == "estimated"
    assert sensitivity_method(replace(cfg, hidden_size=2048, expert_intermediate=1024, num_experts=64)) == "estimated"
    with pytest.raises(ValueError, match="unknown sensitivity method 'exact'"):
        sensitivity_method(cfg, "exact")


def test_compile_with_estimated_sensitivity_says_so_and_resumes_without_searching_again(tiny_with_tokenizer, tmp_path,
                                                                                        monkeypatch):
    """A compile that fails after its search (here: its kernels) keeps the plan for the same command."""
    import json

    from edgemoe.compiler import driver
    from edgemoe.compiler.driver import CompileOptions, compile_model

    from conftest import CALIBRATION, TRAINED_MODEL

    opts = CompileOptions(calibration=CALIBRATION, calibration_tokens=600, tolerance=0.05, sensitivity="estimated",
                          search_text=TRAINED_MODEL / "search.txt", max_seq=64)

    def lost(*args, **kwargs):
        raise OSError("the machine lost its disk while lowering kernels")

    monkeypatch.setattr(driver, "build_kernels", lost)
    first = []
    with pytest.raises(OSError, match="lost its disk"):
        compile_model(tiny_with_tokenizer, tmp_path / "a", opts, log=first.append)
    monkeypatch.undo()
    lines = []
    compile_model(tiny_with_tokenizer, tmp_path / "a", opts, log=lines.append)
    found = json.loads((tmp_path / "a" / "manifest.json").read_text())["bit_plan_search"]
    assert found["sensitivity"] == "estimated" and found["met"], lines
    assert any("by estimated sensitivity" in line for line in lines)
    assert any(line.startswith("resuming: the bit plan searched before") for line in lines), lines
    assert any("sensitivities estimated" in line for line in first)
    assert not any("sensitivities estimated" in line for line in lines), lines
    assert not list((tmp_path / "a").glob(".*"))
