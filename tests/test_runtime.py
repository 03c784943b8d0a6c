"""The C runtime end to end: TVM kernels, expert reads from the image file, the memory budget."""
import shutil
import subprocess

import numpy as np
import pytest

from edgemoe.compiler.driver import CompileOptions, compile_model
from edgemoe.compiler.expert_image import read_table
from edgemoe.compiler.artifact_reference import artifact_model
from edgemoe.models import load_model
from edgemoe.models.reference import ReferenceExecutor
from edgemoe.runtime import DEFAULT_BUILD_DIR, EdgeMoEError, Session, budget_bytes

from conftest import PROMPTS, assert_greedy_matches_reference, assert_matches_reference

N_NEW = 64
# Overhead of a process outside the runtime's budget: executable, libc, kernels.so, stack, page tables.
PROCESS_OVERHEAD = 8 << 20


@pytest.fixture(scope="module")
def tiny_artifact(tiny_mixtral_dir, tmp_path_factory, runtime_lib):
    out = tmp_path_factory.mktemp("tiny_int4")
    compile_model(tiny_mixtral_dir, out, CompileOptions(expert_bits=4, max_seq=64), log=lambda m: None)
    return out


@pytest.fixture(scope="module", params=[(8, None), (4, None), (32, None), (8, False)],
                ids=lambda p: f"trunk{p[0]}" + ("-float-kernels" if p[1] is False else ""))
def tiny_artifact_variant(request, tiny_mixtral_dir, tiny_artifact, tmp_path_factory, runtime_lib):
    """The random model (untied embedding and LM head) with its trunk matrices at each bitwidth, and
    with the float-dequantizing kernels where the integer-dot ones would be chosen."""
    trunk_bits, int_dot = request.param
    if (trunk_bits, int_dot) == (CompileOptions().trunk_bits, None):
        return tiny_artifact
    out = tmp_path_factory.mktemp(f"tiny_trunk{trunk_bits}")
    compile_model(tiny_mixtral_dir, out, CompileOptions(expert_bits=4, trunk_bits=trunk_bits, int_dot=int_dot,
                                                        max_seq=64), log=lambda m: None)
    return out


def test_logits_match_reference_on_random_model(tiny_mixtral_dir, tiny_artifact_variant, rng):
    artifact = tiny_artifact_variant
    ref = ReferenceExecutor(artifact_model(load_model(tiny_mixtral_dir), artifact), 64)
    tokens = rng.integers(0, 160, 48).tolist()
    with Session(artifact) as s:
        got = np.stack([s.decode_step(t) for t in tokens])
    want = np.stack([ref.step(t) for t in tokens])
    assert_matches_reference(got, want, artifact, 1e-4)


@pytest.fixture(scope="module")
def reference_int4(trained_model, artifact_int4):
    return artifact_model(trained_model, artifact_int4)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_trained_model_greedy_tokens_match_reference(artifact_int4, reference_int4, tokenizer, prompt):
    ids = tokenizer.encode(prompt).ids
    ref_tokens, ref_logits = ReferenceExecutor(reference_int4, 256).greedy(ids, N_NEW)
    with Session(artifact_int4) as s:
        logits = [s.prefill(ids)]
        tokens = []
        for _ in range(N_NEW):
            tokens.append(int(logits[-1].argmax()))
            logits.append(s.decode_step(tokens[-1]))
    assert_greedy_matches_reference(tokens, np.stack(logits[:N_NEW]), ref_tokens, ref_logits, artifact_int4, 1e-4)


def test_compute_threads_give_identical_logits(artifact_int4, tokenizer):
    """Rows split over threads are each computed by one thread in the same order: bit-identical."""
    ids = tokenizer.encode(PROMPTS[1]).ids
    runs = {}
    for threads in (1, 2, 3):
        with Session(artifact_int4, threads=threads) as s:
            logits = [s.prefill(ids)]
            for _ in range(16):
                logits.append(s.decode_step(int(logits[-1].argmax())))
        runs[threads] = np.stack(logits)
    assert np.array_equal(runs[1], runs[2]) and np.array_equal(runs[1], runs[3])


def test_logits_do_not_depend_on_which_experts_were_resident(artifact_int4, tokenizer):
    """A layer runs its resident experts first and those still being read after them, but sums their
    outputs in router order: every budget, loader and thread count gives the same bits."""
    from edgemoe.runtime import budget_bytes

    ids = tokenizer.encode(PROMPTS[0]).ids
    runs, stats = {}, {}
    for budget, threads, kwargs in ((0, 1, {}), (0.25, 1, dict(predictor="fitted-router")),
                                    (None, 3, dict(predictor="none")), (0.25, 3, dict(loader_thread=False)),
                                    (0.5, 2, dict(prefetch_layers=2))):
        size = 0 if budget == 0 else budget_bytes(artifact_int4, 256, budget or 0.0)
        with Session(artifact_int4, memory_budget=size, max_seq=256, threads=threads, **kwargs) as s:
            logits = [s.prefill(ids)]
            for _ in range(12):
                logits.append(s.decode_step(int(logits[-1].argmax())))
            stats[budget, threads] = s.stats()
        runs[budget, threads] = np.stack(logits)
    first = runs[0, 1]
    assert all(np.array_equal(first, r) for r in runs.values())
    # with part of the experts cached, layers ran resident and loading experts together
    assert all(st["expert_misses"] > 0 and st["expert_hits"] > 0 for (b, _), st in stats.items() if b), stats


def test_attention_split_over_heads_matches_reference(tmp_path, rng, runtime_lib):
    """A model with 8 KiB of keys and values per cache position (8 heads × 128 dims): its attention's
    heads run on the compute threads, each head's scores in workspace the launch's tasks share. Any
    thread count gives the same bits (each head is one task's), and the reference's logits."""
    import torch
    import transformers

    from edgemoe.compiler.schedules import ATTENTION_PARALLEL_MIN_ROW_BYTES

    cfg = transformers.MixtralConfig(
        vocab_size=160, hidden_size=1024, intermediate_size=32, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, head_dim=128, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=128, tie_word_embeddings=False)
    assert 8 * 128 * 8 >= ATTENTION_PARALLEL_MIN_ROW_BYTES
    torch.manual_seed(7)
    transformers.MixtralForCausalLM(cfg).save_pretrained(tmp_path / "wide")
    art = tmp_path / "art"
    compile_model(tmp_path / "wide", art, CompileOptions(expert_bits=4, max_seq=64), log=lambda m: None)
    tokens = rng.integers(0, 160, 40).tolist()
    runs = {}
    for threads in (1, 3):
        with Session(art, threads=threads) as s:
            runs[threads] = np.stack([s.decode_step(t) for t in tokens])
    assert np.array_equal(runs[1], runs[3])
    ref = ReferenceExecutor(artifact_model(load_model(tmp_path / "wide"), art), 64)
    assert_matches_reference(runs[3], np.stack([ref.step(t) for t in tokens]), art, 1e-4)


def test_quarter_budget_gives_identical_tokens_and_forces_reads(artifact_int4, tokenizer):
    ids = tokenizer.encode(PROMPTS[0]).ids
    with Session(artifact_int4) as full:
        want = full.generate(ids, N_NEW)
        full_stats = full.stats()
    n_records = len(read_table(artifact_int4 / "experts.bin")[1])
    quarter = n_records // 4
    with Session(artifact_int4, memory_budget=budget_bytes(artifact_int4, 0, 0.25), predictor="none") as s:
        got = s.generate(ids, N_NEW)
        st = s.stats()
    assert got == want
    assert st["cache_slots"] == quarter
    assert full_stats["expert_misses"] <= n_records  # every expert read at most once when all fit
    assert st["expert_misses"] > full_stats["expert_misses"]
    assert st["bytes_read"] == st["expert_misses"] * st["record_bytes"]
    assert st["memory_bytes"] <= budget_bytes(artifact_int4, 0, 0.25)


def test_peak_rss_stays_within_budget(artifact_int4, tokenizer):
    """The C tool's whole-process peak RSS under a quarter budget (the runtime reads experts, not mmaps them)."""
    budget = budget_bytes(artifact_int4, 0, 0.25)
    ids = ",".join(map(str, tokenizer.encode(PROMPTS[1]).ids))
    proc = subprocess.run([str(DEFAULT_BUILD_DIR / "edgemoe_run"), str(artifact_int4), "--tokens", ids, "-n", "32",
                           "--budget", str(budget), "--predictor", "next-router"], capture_output=True, text=True,
                          check=True)
    stats = dict(line.split("=") for line in proc.stdout.splitlines()[1:])
    assert int(stats["memory_bytes"]) <= budget
    assert int(stats["expert_misses"]) > 0
    assert int(stats["peak_rss_bytes"]) <= budget + PROCESS_OVERHEAD, stats


def test_budget_below_minimum_is_refused_naming_it(artifact_int4):
    minimum = budget_bytes(artifact_int4)
    with pytest.raises(EdgeMoEError, match=f"below the minimum {minimum} bytes") as e:
        Session(artifact_int4, memory_budget=minimum - 1)
    assert e.value.kind == "budget"
    with Session(artifact_int4, memory_budget=minimum) as s:  # the minimum itself runs
        s.generate([1, 2, 3], 4)


def test_avx2_integer_dot_kernels_match_reference(tiny_mixtral_dir, tmp_path, rng, runtime_lib):
    """The x86 fallback without VNNI (pmaddubsw/pmaddwd), run on this CPU when it has AVX2."""
    from test_kernels import runs_here

    from edgemoe.targets import load_target

    if not runs_here(load_target("x86-avx2")):
        pytest.skip("this CPU has no AVX2")
    compile_model(tiny_mixtral_dir, tmp_path, CompileOptions(target="x86-avx2", expert_bits=4, max_seq=64),
                  log=lambda m: None)
    ref = ReferenceExecutor(artifact_model(load_model(tiny_mixtral_dir), tmp_path), 64)
    tokens = rng.integers(0, 160, 32).tolist()
    want = np.stack([ref.step(t) for t in tokens])
    with Session(tmp_path) as s:
        got = np.stack([s.decode_step(t) for t in tokens])
    assert_matches_reference(got, want, tmp_path, 1e-4)


def test_float16_experts_match_reference(tiny_mixtral_dir, tmp_path, rng, runtime_lib):
    compile_model(tiny_mixtral_dir, tmp_path, CompileOptions(expert_bits=16, max_seq=64), log=lambda m: None)
    ref = ReferenceExecutor(artifact_model(load_model(tiny_mixtral_dir), tmp_path), 64)
    tokens = rng.integers(0, 160, 24).tolist()
    want = np.stack([ref.step(t) for t in tokens])
    with Session(tmp_path, memory_budget=budget_bytes(tmp_path, 0, 0.5)) as s:
        got = np.stack([s.decode_step(t) for t in tokens])
    assert_matches_reference(got, want, tmp_path, 1e-4)


@pytest.mark.parametrize("int_dot", [None, False], ids=["tiles", "rows"])
def test_mixed_bit_plan_matches_reference_and_uses_sized_slots(tiny_mixtral_dir, tmp_path, rng, runtime_lib, int_dot):
    plan = [[2, 4, 8, 3], [8, 3, 2, 4]]
    compile_model(tiny_mixtral_dir, tmp_path, CompileOptions(bit_plan=plan, max_seq=64, int_dot=int_dot),
                  log=lambda m: None)
    _, records = read_table(tmp_path / "experts.bin")
    assert [r.bits for r in records] == [b for row in plan for b in row]
    assert len({r.length for r in records}) == 3  # INT2 and INT3 records both pad to 2 pages here
    ref = ReferenceExecutor(artifact_model(load_model(tiny_mixtral_dir), tmp_path), 64)
    tokens = rng.integers(0, 160, 40).tolist()
    want = np.stack([ref.step(t) for t in tokens])
    for fraction in (0.0, 0.5, 1.0):
        with Session(tmp_path, memory_budget=budget_bytes(tmp_path, 0, fraction)) as s:
            got = np.stack([s.decode_step(t) for t in tokens])
            st = s.stats()
        assert_matches_reference(got, want, tmp_path, 1e-4)
        assert st["memory_bytes"] <= budget_bytes(tmp_path, 0, fraction)
    # the minimum holds top-k (2) slots of each of the three sizes, not 6 of the largest
    sizes = sorted({r.length for r in records})

    assert st["cache_slots"] == 8 and budget_bytes(tmp_path) < budget_bytes(tmp_path, 0, 1.0)
    assert budget_bytes(tmp_path, 0, 1.0) - budget_bytes(tmp_path) < 6 * sizes[-1] + 2 * sum(sizes)


def test_a_budget_with_four_record_sizes_leaves_no_slot_unbought(tmp_path, runtime_lib):
    """Each size class gets its share of the cache, rounded down to whole slots; what that leaves
    over buys more slots, so less than one slot (of the largest size, with its bookkeeping) stays
    unused at any budget. Before, each of the four classes could strand most of a slot."""
    from conftest import TRAINED_MODEL

    plan = [[(2, 3, 4, 8)[(layer + e) % 4] for e in range(8)] for layer in range(6)]
    compile_model(TRAINED_MODEL, tmp_path, CompileOptions(bit_plan=plan, max_seq=64), log=lambda m: None)
    largest = max(r.length for r in read_table(tmp_path / "experts.bin")[1])
    lo, hi = budget_bytes(tmp_path), budget_bytes(tmp_path, 0, 1.0)
    for budget in np.linspace(lo, hi, 12)[1:-1].astype(int):
        with Session(tmp_path, memory_budget=int(budget), predictor="none") as s:
            left = int(budget) - s.stats()["memory_bytes"]
        assert 0 <= left < largest + 4096, (budget, left)


def test_out_of_range_token_and_full_context(tiny_artifact):
    with Session(tiny_artifact, max_seq=4) as s:
        with pytest.raises(EdgeMoEError, match="token id 160 out of range"):
            s.decode_step(160)
        s.prefill([1, 2, 3, 4])
        with pytest.raises(EdgeMoEError, match="context full"):
            s.decode_step(5)


def _first_expert_used(model_dir, token):
    ex = ReferenceExecutor(load_model(model_dir), 4)
    ex.step(token)
    return int(ex.trace[0][0][0])


def test_corrupted_expert_record_is_refused_naming_it(tiny_mixtral_dir, tiny_artifact, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    _, records = read_table(art / "experts.bin")
    expert = _first_expert_used(tiny_mixtral_dir, 7)
    rec = records[expert]  # layer 0
    with open(art / "experts.bin", "r+b") as f:
        f.seek(rec.offset + 100)
        b = f.read(1)
        f.seek(rec.offset + 100)
        f.write(bytes([b[0] ^ 0x55]))
    with Session(art) as s:
        with pytest.raises(EdgeMoEError, match=f"expert record {expert} \\(layer 0, expert {expert}\\) failed its checksum"):
            s.decode_step(7)


def test_truncated_image_is_refused_at_open(tiny_artifact, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    size = (art / "experts.bin").stat().st_size
    with open(art / "experts.bin", "r+b") as f:
        f.truncate(size - 4096)
    with pytest.raises(EdgeMoEError, match="experts.bin: truncated"):
        Session(art)


@pytest.mark.parametrize("name,offset", [("trunk.bin", 20), ("trunk.bin", 4000), ("experts.bin", 17)])
def test_corrupted_header_or_trunk_is_refused(tiny_artifact, tmp_path, name, offset):
    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    with open(art / name, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(EdgeMoEError, match="checksum mismatch") as e:
        Session(art)
    assert e.value.kind == "format"


def test_missing_artifact_is_named(tmp_path, runtime_lib):
    with pytest.raises(EdgeMoEError, match="cannot open .*trunk.bin"):
        Session(tmp_path)


def test_defaults_are_the_best_the_routing_profile_allows(tiny_artifact, artifact_int4):
    """By default the runtime predicts with the fitted router and evicts by EdgeMoE's score where the
    artifact was compiled with calibration text, and falls back to the next router and LRU where not;
    without a loader thread there is nothing to prefetch with."""
    with Session(artifact_int4) as s:
        assert (s.info["predictor"], s.info["eviction"]) == ("fitted-router", "edgemoe")
    with Session(tiny_artifact) as s:
        assert (s.info["predictor"], s.info["eviction"]) == ("next-router", "lru")
    with Session(artifact_int4, loader_thread=False) as s:
        assert s.info["predictor"] == "none"
    with pytest.raises(EdgeMoEError, match="needs the routing profile"):
        Session(tiny_artifact, predictor="fitted-router")
