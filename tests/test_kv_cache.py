"""A float16 KV cache (edgemoe-compile --kv-cache float16) on the bundled trained model: the runtime
against the reference that stores keys and values as float16, half the bytes of a float32 cache,
and the float32 cache's perplexity on held-out text. (Every family with a float16 cache against its
reference: test_families' mixed-plan-kv16 variant; the rounding itself: runtime_c/tests/test_core.c.)"""
from __future__ import annotations


import numpy as np
import pytest

from conftest import DATA_DIR, TRAINED_MODEL, assert_matches_reference

MAX_SEQ = 128
HELD_OUT = DATA_DIR / "wikitext-2-test.txt"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, runtime_lib) -> dict:
    """The bundled model compiled twice, the same experts and trunk: KV cache float32, and float16."""
    from edgemoe.compiler.driver import CompileOptions, compile_model

    root = tmp_path_factory.mktemp("kv_cache")
    for kv in ("float32", "float16"):
        compile_model(TRAINED_MODEL, root / kv, CompileOptions(expert_bits=4, max_seq=MAX_SEQ, kv_cache=kv),
                      log=lambda m: None)
    return {kv: root / kv for kv in ("float32", "float16")}


@pytest.fixture(scope="module")
def held_out_tokens(tokenizer) -> list[int]:
    text = HELD_OUT.read_text(encoding="utf-8")[20000:60000]
    return tokenizer.encode(text).ids


def test_the_runtime_is_the_reference_that_stores_float16(artifacts, trained_model, held_out_tokens, rng):
    from edgemoe.compiler.artifact_reference import artifact_model
    from edgemoe.models.reference import ReferenceExecutor
    from edgemoe.runtime import Session, budget_bytes

    start = int(rng.integers(0, len(held_out_tokens) - 96))
    tokens = held_out_tokens[start : start + 96]
    art = artifacts["float16"]
    ref_model = artifact_model(trained_model, art)
    assert ref_model.kv_cache == "float16"
    ref = ReferenceExecutor(ref_model, MAX_SEQ)
    want = np.stack([ref.step(t) for t in tokens])
    assert ref.k_cache.dtype == np.float16
    with Session(art, memory_budget=budget_bytes(art), threads=2) as s:
        assert s.info["kv_cache_bits"] == 16
        got = np.stack([s.decode_step(t) for t in tokens])
    assert_matches_reference(got, want, art, 1e-4)
    # and a prompt in batches reads the same cache: the same bits as token by token
    with Session(art, memory_budget=budget_bytes(art), threads=2, prefill_tokens=16) as s:
        batched = np.stack([s.prefill(tokens[:40]), *(s.decode_step(t) for t in tokens[40:])])
    assert np.array_equal(batched, got[39:])
    # the keys and values were rounded: the float32 cache's logits differ, by about 1% of their range for
    # most tokens (the int8 activations of the integer-dot kernels turn the rounding into whole steps), more
    # where a router near a tie picks another expert, and the predicted tokens are nearly all the same
    # (twelve windows measured: median 0.7-0.9%, agreement 94-100%)
    with Session(artifacts["float32"]) as s:
        assert s.info["kv_cache_bits"] == 32
        full = np.stack([s.decode_step(t) for t in tokens])
    assert not np.array_equal(full, got)
    per_token = np.abs(full - got).max(axis=1) / np.abs(full).max(axis=1)
    assert np.median(per_token) <= 0.03, per_token
    assert np.mean(full.argmax(axis=1) == got.argmax(axis=1)) >= 0.85


def test_half_the_kv_bytes_and_a_smaller_minimum_budget(artifacts):
    from edgemoe.runtime import Session, budget_bytes

    kv = {}
    for name, art in artifacts.items():
        with Session(art) as s:
            kv[name] = s.stats()["kv_cache_bytes"]
    page = 4096
    assert abs(2 * kv["float16"] - kv["float32"]) <= 2 * page, kv
    saved = budget_bytes(artifacts["float32"]) - budget_bytes(artifacts["float16"])
    assert abs(saved - kv["float32"] // 2) <= 2 * page, (saved, kv)


def test_held_out_perplexity_is_the_float32_caches(artifacts, held_out_tokens):
    from edgemoe.evaluate import perplexity_artifact

    tokens = held_out_tokens[:4 * MAX_SEQ]
    ppl = {name: perplexity_artifact(art, tokens, window=MAX_SEQ)["perplexity"] for name, art in artifacts.items()}
    assert abs(ppl["float16"] / ppl["float32"] - 1) <= 0.002, ppl
