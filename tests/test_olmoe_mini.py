"""The second bundled model, olmoe-mini (OLMoE, 64 experts top-8, trained): the importer and the
reference against transformers, the compiled runtime against the reference, and expert-cache
behaviour on its real fine-grained routing."""
from pathlib import Path

import numpy as np
import pytest

from edgemoe.compiler.artifact_reference import artifact_model
from edgemoe.compiler.driver import CompileOptions, compile_model
from edgemoe.models import load_model
from edgemoe.models.reference import ReferenceExecutor
from edgemoe.runtime import Session, budget_bytes

from conftest import CALIBRATION, PROMPTS, REPO, assert_greedy_matches_reference

OLMOE_MINI = REPO / "models" / "zoo" / "olmoe-mini"
N_NEW = 24


@pytest.fixture(scope="module")
def olmoe_mini():
    return load_model(OLMOE_MINI)


@pytest.fixture(scope="module")
def olmoe_int4(tmp_path_factory, runtime_lib) -> Path:
    out = tmp_path_factory.mktemp("olmoe_mini_int4")
    opts = CompileOptions(expert_bits=4, max_seq=256, calibration=CALIBRATION, calibration_tokens=4096)
    compile_model(OLMOE_MINI, out, opts, log=lambda m: None)
    return out


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    return tokenizer.encode(PROMPTS[2]).ids


def test_reference_matches_transformers(olmoe_mini, prompt_ids):
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(OLMOE_MINI, dtype=torch.float32).eval()
    assert hf.config.num_experts == 64 and hf.config.num_experts_per_tok == 8
    with torch.no_grad():
        want = hf(torch.tensor([prompt_ids])).logits[0].numpy()
    ref = ReferenceExecutor(olmoe_mini, 64)
    got = np.stack([ref.step(t) for t in prompt_ids])
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())


def test_runtime_greedy_tokens_match_the_reference(olmoe_mini, olmoe_int4, prompt_ids):
    ref_tokens, ref_logits = ReferenceExecutor(artifact_model(olmoe_mini, olmoe_int4), 256).greedy(prompt_ids, N_NEW)
    budget = budget_bytes(olmoe_int4, 0, 0.25)
    with Session(olmoe_int4, memory_budget=budget, predictor="fitted-router", eviction="edgemoe") as s:
        logits = [s.prefill(prompt_ids)]
        tokens = []
        for _ in range(N_NEW):
            tokens.append(int(logits[-1].argmax()))
            logits.append(s.decode_step(tokens[-1]))
        assert s.stats()["expert_misses"] > 0  # a quarter of the experts: reads happen
    assert_greedy_matches_reference(tokens, np.stack(logits[:N_NEW]), ref_tokens, ref_logits, olmoe_int4, 1e-4)


def test_edgemoe_eviction_reads_less_than_lru_on_held_out_text(olmoe_int4, tokenizer):
    """Routing is deterministic, so the misses are too: on WikiText-2 test text (never trained on) at
    a quarter of the experts, EdgeMoE eviction (profile frequency blended with recent use) misses
    less than LRU; the profile's frequency alone did worse than LRU on this model."""
    text = (REPO / "data" / "wikitext-2-test.txt").read_text()[20000:40000]
    ids = tokenizer.encode(text).ids[:192]
    budget = budget_bytes(olmoe_int4, 0, 0.25)
    misses = {}
    for eviction in ("lru", "edgemoe"):
        with Session(olmoe_int4, memory_budget=budget, loader_thread=False, eviction=eviction,
                     prefill_tokens=1) as s:  # token by token, as decoding meets the text
            s.prefill(ids)
            misses[eviction] = s.stats()["expert_misses"]
    assert misses["edgemoe"] < 0.92 * misses["lru"], misses  # measured: 0.87×


def test_experts_run_side_by_side_give_the_same_bits(olmoe_int4, prompt_ids):
    """With several compute threads a layer's chosen experts run on them at once (expert_lanes.h),
    each as soon as its read lands. Whatever thread ran which expert, and whichever had arrived
    together, they are summed in the router's order: the logits are bit-identical to one thread's,
    all experts resident or a quarter of them read from slow storage with prefetching."""
    quarter = budget_bytes(olmoe_int4, 0, 0.25)
    runs = {}
    for threads, budget in ((1, 0), (2, 0), (3, 0), (2, quarter), (3, quarter)):
        slow = {"emulate": (400e6, 50e-6), "readers": 4, "predictor": "fitted-router"} if budget else {}
        with Session(olmoe_int4, memory_budget=budget, threads=threads, **slow) as s:
            assert s.info["expert_lanes"] == threads
            logits = [s.prefill(prompt_ids)]
            for _ in range(12):
                logits.append(s.decode_step(int(logits[-1].argmax())))
            assert not budget or s.stats()["expert_misses"] > 0
        runs[threads, budget] = np.stack(logits)
    for key, got in runs.items():
        assert np.array_equal(got, runs[1, 0]), key
