"""A prompt run a batch of tokens at a time through each layer (em_params.prefill_tokens): the same
bits as token by token, each expert its tokens chose read once per batch and layer, and a prompt
that cannot be fed changes nothing."""
from __future__ import annotations

import numpy as np
import pytest

from edgemoe.runtime import EdgeMoEError, Session, budget_bytes

# A slow device, so that reads are still in flight when a batch's experts are run
SLOW_STORAGE = (200e6, 0.0005)


def feed(s: Session, prompt: list[int], then: list[int]) -> np.ndarray:
    """The logits after the prompt and after each further token."""
    return np.stack([s.prefill(prompt), *(s.decode_step(t) for t in then)])


def distinct_per_batch(trace: np.ndarray, batch: int) -> int:
    """Σ over batches and layers of the distinct experts the batch's tokens chose."""
    return sum(len(np.unique(trace[i : i + batch, l])) for i in range(0, len(trace), batch)
               for l in range(trace.shape[1]))


@pytest.fixture(scope="module")
def prompt(artifact_int4, rng_module):
    from conftest import DATA_DIR

    from edgemoe.compiler.profile import tokenize_file

    text = tokenize_file(artifact_int4 / "tokenizer.json", DATA_DIR / "wikitext-2-test.txt", 2048)
    start = int(rng_module.integers(0, len(text) - 100))
    return text[start : start + 100].tolist()


@pytest.fixture(scope="module")
def rng_module():
    return np.random.default_rng()


@pytest.mark.parametrize("threads", [1, 2])
def test_a_batch_at_a_time_gives_the_bits_token_by_token_gives(artifact_int4, prompt, threads):
    """At a quarter of the experts, reads slow enough to be in flight, the default predictor and
    eviction: every batch size gives the token-by-token logits and routing, after the prompt and for
    the tokens decoded after it (the KV cache the batch wrote is the one decoding reads)."""
    from edgemoe.bench import batched_kernels

    budget = budget_bytes(artifact_int4, 256, 0.25)
    runs, traces = {}, {}
    for batch, kernels in [(1, True), (2, True), (7, True), (16, True), (64, True), (64, False)]:
        with Session(artifact_int4, memory_budget=budget, max_seq=256, emulate=SLOW_STORAGE, threads=threads,
                     prefill_tokens=batch, batched_kernels=kernels) as s:
            s.trace_routing(len(prompt))
            runs[batch, kernels] = feed(s, prompt[:90], prompt[90:])
            traces[batch, kernels] = s.routing_trace()
            st = s.stats()
        assert st["tokens"] == len(prompt)
        # from 4 tokens a batch on, the attention projections and experts take 4 tokens per call
        assert (st["batched_calls"] > 0) == (batch >= 4 and kernels and batched_kernels(artifact_int4)), (batch, st)
    for key in runs:
        assert np.array_equal(runs[key], runs[1, True]), key
        assert np.array_equal(traces[key], traces[1, True]), key


def test_a_batch_reads_each_expert_its_tokens_chose_once_per_layer(artifact_int4, prompt):
    """Nothing predicted or preloaded, a cold cache of a quarter of the experts: a batch reads at most
    the distinct experts its tokens chose in each layer (fewer where the last batch left some
    resident); token by token reads more."""
    budget = budget_bytes(artifact_int4, 256, 0.25)
    reads = {}
    for batch in (1, 16, 64):
        with Session(artifact_int4, memory_budget=budget, max_seq=256, predictor="none", prefill_tokens=batch) as s:
            s.trace_routing(len(prompt))
            s.prefill(prompt)
            st, trace = s.stats(), s.routing_trace()
        reads[batch] = st["records_read"]
        if batch > 1:
            assert 0 < st["records_read"] <= distinct_per_batch(trace, batch), (batch, st)
            assert st["expert_hits"] + st["expert_misses"] == distinct_per_batch(trace, batch)
    assert reads[64] <= reads[16] < reads[1], reads


def test_a_prompt_that_cannot_be_fed_changes_nothing(artifact_int4, prompt):
    """A token out of range anywhere in the prompt, or a prompt longer than the context left, is refused
    before any of it runs: the session then continues as if the call had not been made."""
    with Session(artifact_int4, max_seq=32) as s:
        want = feed(s, prompt[:10], prompt[10:12])[1:]
    with Session(artifact_int4, max_seq=32) as s:
        s.prefill(prompt[:10])
        vocab = s.info["vocab_size"]
        with pytest.raises(EdgeMoEError, match=f"token id {vocab} out of range .* at prompt position 3"):
            s.prefill(prompt[10:13] + [vocab] + prompt[13:20])
        with pytest.raises(EdgeMoEError, match="a prompt of 30 tokens after 10 does not fit in 32"):
            s.prefill(prompt[10:40])
        got = np.stack([s.decode_step(t) for t in prompt[10:12]])
    assert np.array_equal(got, want)


def test_a_batch_whose_reads_fail_can_be_fed_again(artifact_int4, prompt):
    """Twelve reads in a row fail: the prompt fails with the cause named, pins nothing and keeps none
    of itself; fed again once the storage recovers it gives the fault-free logits."""
    budget = budget_bytes(artifact_int4, 256, 0.25)
    with Session(artifact_int4, memory_budget=budget, max_seq=256, predictor="none") as s:
        want = feed(s, prompt[:40], prompt[40:42])
    errors = []
    with Session(artifact_int4, memory_budget=budget, max_seq=256, predictor="none", inject_faults="eio@2*12") as s:
        for _ in range(16):
            try:
                first = s.prefill(prompt[:40])
                break
            except EdgeMoEError as e:
                errors.append(str(e))
        got = np.stack([first, *(s.decode_step(t) for t in prompt[40:42])])
    assert errors and all("Input/output error" in e for e in errors), errors
    assert np.array_equal(got, want)


def test_the_batch_comes_out_of_the_budget_and_out_of_range_is_refused(artifact_int4):
    """The minimum budget pays for the default batch; a larger batch needs more and says so."""
    minimum = budget_bytes(artifact_int4, 256, 0.0)
    with Session(artifact_int4, memory_budget=minimum, max_seq=256) as s:
        assert s.stats()["memory_bytes"] <= minimum
    with pytest.raises(EdgeMoEError, match="below the minimum") as e:
        Session(artifact_int4, memory_budget=minimum, max_seq=256, prefill_tokens=256)
    assert e.value.kind == "budget" and "prefill_tokens" in str(e.value)
    for bad in (1025, 1 << 20):
        with pytest.raises(EdgeMoEError, match="prefill_tokens must be within"):
            Session(artifact_int4, prefill_tokens=bad)


def test_prefill_bench_prints_each_batch_beside_token_by_token(artifact_int4, tmp_path):
    """edgemoe-bench prefill: a row per prompt length, budget, batch size and (--compare-kernels) kernel
    form, each with the same logits as token by token and, at a small budget, fewer reads; a batch too
    large for the budget is said to be, not a traceback; the chart is written."""
    from click.testing import CliRunner

    from edgemoe.bench import batched_kernels, bench_cmd
    from edgemoe.runtime import REPO_ROOT

    chart = tmp_path / "prefill.png"
    r = CliRunner().invoke(bench_cmd, ["prefill", str(artifact_int4), "--text",
                                       str(REPO_ROOT / "data" / "wikitext-2-test.txt"), "--prompt-tokens", "100",
                                       "--fractions", "0.001,0.25,1", "--batches", "16,100", "--emulate-storage",
                                       "1000,0", "--compare-kernels", "--plot", str(chart)])
    assert r.exit_code == 0, r.output
    rows = [line.strip("| ").split(" | ") for line in r.output.splitlines() if line.startswith("| 100 |")]
    forms = ("batched", "single") if batched_kernels(artifact_int4) else ("single",)
    expected = [(b, k) for b in ("16", "100") for k in forms]
    assert [tuple(row[1:4]) for row in rows] == [(f, *bk) for f in ("0%", "25%", "100%") for bk in [("1", "single"), *expected]]
    fits = [row for row in rows if "does not fit" not in row[4]]
    # the minimum budget (0.1% of the experts) pays for the default batch of 64, not for 100
    assert ["0%", "100"] not in [row[1:3] for row in fits] and len(fits) == 3 * (1 + len(expected)) - len(forms), r.output
    assert all(row[-1] == "True" for row in fits), r.output
    reads = {tuple(row[1:4]): int(row[7]) for row in fits}
    assert reads["25%", "16", forms[0]] < reads["25%", "1", "single"], reads
    assert chart.stat().st_size > 0


def test_the_c_tool_takes_a_prompt_in_batches_with_the_same_tokens(artifact_int4, prompt):
    """edgemoe_run --prefill-tokens N: the same generated tokens for any N, and prefill_ns reported."""
    import subprocess

    from edgemoe.runtime import DEFAULT_BUILD_DIR

    budget = budget_bytes(artifact_int4, 256, 0.25)
    outs = {}
    for batch in ("1", "7", "64"):
        proc = subprocess.run([str(DEFAULT_BUILD_DIR / "edgemoe_run"), str(artifact_int4), "--tokens",
                               ",".join(map(str, prompt[:60])), "-n", "8", "--max-seq", "256", "--budget", str(budget),
                               "--prefill-tokens", batch], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        stats = dict(line.split("=", 1) for line in lines[1:] if "=" in line)
        assert int(stats["prefill_ns"]) > 0 and int(stats["tokens"]) == 60 + 8, stats
        outs[batch] = lines[0]
    assert outs["7"] == outs["64"] == outs["1"], outs
