"""Expert management: the loader thread, predictors, eviction policies and storage backends.

The output never depends on them: every configuration must give the tokens of the plain run."""
import subprocess
import sys
import textwrap

import pytest

from edgemoe.runtime import DEFAULT_BUILD_DIR, REPO_ROOT, EdgeMoEError, Session, budget_bytes

from conftest import PROMPTS

N_NEW = 48


@pytest.fixture(scope="module")
def quarter_budget(artifact_int4):
    return budget_bytes(artifact_int4, 0, 0.25)


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    return tokenizer.encode(PROMPTS[1]).ids


@pytest.fixture(scope="module")
def plain_tokens(artifact_int4, prompt_ids):
    with Session(artifact_int4, loader_thread=False, predictor="none") as s:
        return s.generate(prompt_ids, N_NEW)


CONFIGS = [
    dict(predictor="none", eviction="lru", loader_thread=False),
    dict(predictor="none", eviction="fifo"),
    dict(predictor="next-router", eviction="lru"),
    dict(predictor="next-router", eviction="edgemoe"),
    dict(predictor="path-table", eviction="edgemoe"),
    dict(predictor="path-table", eviction="lru", prefetch_experts=4),
    dict(predictor="wrong", eviction="lru"),
    dict(predictor="fitted-router", eviction="edgemoe"),
    dict(predictor="next-router", eviction="lru", storage="mmap"),
    dict(predictor="next-router", eviction="lru", direct_io=True),
    dict(predictor="next-router", eviction="edgemoe", emulate=(1.7e9, 1e-4)),
    dict(predictor="fitted-router", eviction="edgemoe", emulate=(1.7e9, 1e-4), readers=4),
    dict(predictor="path-table", eviction="lru", storage="mmap", readers=3),
    dict(predictor="fitted-router", eviction="edgemoe", prefetch_margin=0.5),
    dict(predictor="path-table", eviction="lru", prefetch_margin=1.0, prefetch_experts=5),
    dict(predictor="fitted-router", eviction="edgemoe", readers=2, coalesce=False),
    dict(predictor="fitted-router", eviction="edgemoe", prefetch_layers=2, readers=4),
    dict(predictor="next-router", eviction="lru", prefetch_layers=4),
    dict(predictor="fitted-router", eviction="edgemoe", preload=True, readers=2),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_tokens_never_depend_on_management(artifact_int4, quarter_budget, prompt_ids, plain_tokens, cfg):
    with Session(artifact_int4, memory_budget=quarter_budget, **cfg) as s:
        assert s.generate(prompt_ids, N_NEW) == plain_tokens
        st = s.stats()
    assert st["expert_misses"] > 0  # the budget really forces reads
    if cfg.get("predictor", "none") != "none":
        assert st["prefetch_issued"] > 0 and st["predicted"] > 0
        assert st["prefetch_used"] + st["prefetch_wasted"] <= st["prefetch_issued"]


def test_wrong_predictions_are_counted_as_misses(artifact_int4, quarter_budget, prompt_ids):
    """The deliberately wrong predictor names the experts the router ranks lowest: it must score well below
    a random guess (top-k of E experts: k/E of guesses are used), and the next-layer router well above it."""
    chance = 2 / 8  # mixtral-mini routes each token to 2 of 8 experts
    rates = {}
    for pred in ("next-router", "wrong"):
        with Session(artifact_int4, memory_budget=quarter_budget, predictor=pred) as s:
            s.generate(prompt_ids, N_NEW)
            st = s.stats()
        rates[pred] = st["predicted_hits"] / st["predicted"]
    assert rates["wrong"] < chance / 2 and rates["next-router"] > 2 * chance


# A board whose compute is slower than this machine's (0.5 GB/s, 5 G int8 op/s, 2 GFLOP/s), so that a
# layer's compute spans reads from SLOW_STORAGE: the link has time to spare for prefetches.
SLOW_STORAGE, SLOW_COMPUTE = (250e6, 2e-4), (0.5e9, 5e9, 2e9)


def _management_stats(artifact, budget, prompt_ids, n_new=24, **options):
    with Session(artifact, memory_budget=budget, **options) as s:
        s.generate(prompt_ids, n_new)
        return s.stats()


def test_prefetching_reduces_stalls_on_slow_storage(artifact_int4, quarter_budget, prompt_ids):
    """Same budget and storage: the share of experts found resident when needed rises with prediction."""
    hit = {}
    for pred in ("none", "next-router"):
        st = _management_stats(artifact_int4, quarter_budget, prompt_ids, predictor=pred, emulate=SLOW_STORAGE,
                               emulate_compute=SLOW_COMPUTE)
        hit[pred] = st["expert_hits"] / (st["expert_hits"] + st["expert_misses"])
        assert st["prefetch_declined"] <= st["prefetch_issued"], st
    assert hit["next-router"] > hit["none"]


def test_prefetches_that_go_unused_stop_while_the_link_is_busy(artifact_int4, quarter_budget, prompt_ids):
    """Prefetching is declined while the link to storage has lately been busier than the guesses a prefetch
    would read were right: the wrong predictor's, never right, soon stop (it then reads what no prediction
    reads), on storage the decode waits on and on storage with time to spare alike; the next-layer
    router's, mostly right, go on where the link has time for them."""
    for compute in (None, SLOW_COMPUTE):
        plain = _management_stats(artifact_int4, quarter_budget, prompt_ids, predictor="none", emulate=SLOW_STORAGE,
                                  emulate_compute=compute)
        wrong = _management_stats(artifact_int4, quarter_budget, prompt_ids, predictor="wrong", emulate=SLOW_STORAGE,
                                  emulate_compute=compute)
        assert wrong["prefetch_used"] == 0 and 0 < wrong["prefetch_issued"] <= 16, wrong
        assert wrong["prefetch_declined"] >= 5 * wrong["prefetch_issued"], wrong
        assert wrong["records_read"] <= plain["records_read"] + 2 * wrong["prefetch_issued"], (wrong, plain)
    good = _management_stats(artifact_int4, quarter_budget, prompt_ids, predictor="next-router", emulate=SLOW_STORAGE,
                             emulate_compute=SLOW_COMPUTE)
    assert good["prefetch_declined"] < good["prefetch_issued"] < 2 * good["prefetch_used"], good


def test_path_table_needs_calibration(tiny_artifact_uncalibrated):
    for predictor in ("path-table", "fitted-router"):
        with pytest.raises(EdgeMoEError, match="compile with calibration text"):
            Session(tiny_artifact_uncalibrated, predictor=predictor)
    with pytest.raises(EdgeMoEError, match="compile with calibration text"):
        Session(tiny_artifact_uncalibrated, eviction="edgemoe")


@pytest.fixture(scope="module")
def tiny_artifact_uncalibrated(tiny_mixtral_dir, tmp_path_factory, runtime_lib):
    from edgemoe.compiler.driver import CompileOptions, compile_model

    out = tmp_path_factory.mktemp("tiny_uncal")
    compile_model(tiny_mixtral_dir, out, CompileOptions(expert_bits=8, max_seq=64), log=lambda m: None)
    return out


FAILED_READ_SCRIPT = textwrap.dedent("""
    import os, sys
    from edgemoe.runtime import Session, EdgeMoEError
    art, budget, predictor, thread = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "thread"
    with Session(art, memory_budget=budget, predictor=predictor, loader_thread=thread) as s:
        s.prefill([5, 6, 7])
        os.truncate(os.path.join(art, "experts.bin"), 8192)  # the storage fails under the running session
        try:
            for t in range(40):
                s.decode_step(10 + t)
        except EdgeMoEError as e:
            print("ERROR", e.kind, e)
            sys.exit(0)
    print("NO ERROR")
""")


@pytest.mark.parametrize("predictor,loader", [("next-router", "thread"), ("none", "thread"), ("none", "inline")])
def test_failed_read_ends_the_step_with_an_error_not_a_hang(artifact_int4, quarter_budget, tmp_path, predictor, loader):
    import shutil

    art = tmp_path / "art"
    shutil.copytree(artifact_int4, art)
    proc = subprocess.run([sys.executable, "-c", FAILED_READ_SCRIPT, str(art), str(quarter_budget), predictor, loader],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "ERROR" in proc.stdout and "the file ends before it" in proc.stdout, proc.stdout


def test_loader_and_compute_threads_are_clean_under_thread_sanitizer(artifact_int4, quarter_budget, prompt_ids):
    build = REPO_ROOT / "build" / "tsan"
    for cmd in (["cmake", "-S", str(REPO_ROOT), "-B", str(build), "-DEM_SANITIZE=thread", "-DCMAKE_BUILD_TYPE=Debug"],
                ["cmake", "--build", str(build), "--target", "edgemoe_run", "-j", "2"]):
        subprocess.run(cmd, check=True, capture_output=True)
    for pred in ("next-router", "path-table"):
        proc = subprocess.run([str(build / "edgemoe_run"), str(artifact_int4), "--tokens", ",".join(map(str, prompt_ids)),
                               "-n", "24", "--budget", str(quarter_budget), "--predictor", pred, "--eviction", "edgemoe",
                               "--emulate", "500,0.05", "--threads", "2", "--readers", "3"], capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert "ThreadSanitizer" not in proc.stderr, proc.stderr
        stats = dict(line.split("=") for line in proc.stdout.splitlines()[1:])
        assert int(stats["prefetch_issued"]) > 0


def test_prefetch_margin_names_the_near_ties_of_the_kth_expert(artifact_int4, quarter_budget, prompt_ids):
    """With a margin a prediction names the top-k and then the experts scoring within the margin of the
    k-th, at most the cap: between k and the cap per prediction, more the wider the margin, each
    naming at least what the top-k alone names; a margin of 0 is the fixed count."""
    runs = {}
    for margin in (0.0, 0.3, 3.0):
        with Session(artifact_int4, memory_budget=quarter_budget, predictor="next-router", prefetch_margin=margin,
                     prefetch_experts=6 if margin else 0) as s:
            s.generate(prompt_ids, N_NEW)
            runs[margin] = s.stats()
    top_k = 2
    named = {m: st["prefetch_named"] / st["predictions"] for m, st in runs.items()}
    hit = {m: st["predicted_hits"] / st["predicted"] for m, st in runs.items()}
    assert named[0.0] == top_k and top_k < named[0.3] < named[3.0] <= 6, named
    assert hit[0.0] <= hit[0.3] <= hit[3.0], hit
    for bad in (-1.0, 101.0, float("nan")):
        with pytest.raises(EdgeMoEError, match="prefetch_margin must be within"):
            Session(artifact_int4, prefetch_margin=bad)


def test_adjacent_records_queued_together_are_read_in_one_request(artifact_int4, prompt_ids, plain_tokens):
    """A layer's misses and a prediction's experts are queued together; those whose records lie side
    by side in experts.bin are read in one request (the compiler sets often co-chosen experts
    together). At the minimum budget most experts a token uses are read: with coalescing some
    requests carry several records, without it each carries one; the tokens are the plain run's."""
    budget = budget_bytes(artifact_int4, 0, 0.0)
    runs = {}
    for coalesce in (True, False):
        with Session(artifact_int4, memory_budget=budget, predictor="fitted-router", eviction="edgemoe",
                     coalesce=coalesce) as s:
            assert s.generate(prompt_ids, N_NEW) == plain_tokens
            runs[coalesce] = s.stats()
    alone, together = runs[False], runs[True]
    assert alone["read_requests"] == alone["records_read"] + alone["read_retries"]
    assert together["read_retries"] == 0 and together["read_requests"] < together["records_read"], together


def test_prefetch_layers_guesses_the_layers_after_the_next_within_the_token(artifact_int4, quarter_budget,
                                                                           prompt_ids):
    """With prefetch_layers = a, each layer with experts guesses the next one and the a - 1 after it
    that the same token still reaches: per token L + (L - 1) + … predictions for L layers, the next-layer
    guesses alone scored in the stats (the same hit rate as with a = 1). Out of range is refused."""
    runs = {}
    for ahead in (1, 2, 3):
        with Session(artifact_int4, memory_budget=quarter_budget, predictor="fitted-router", eviction="edgemoe",
                     prefetch_layers=ahead, prefill_tokens=1) as s:  # the prompt predicted token by token too
            s.generate(prompt_ids, N_NEW)
            runs[ahead] = s.stats()
            layers = s.info["num_expert_layers"]
    tokens = runs[1]["tokens"]
    for ahead, st in runs.items():
        assert st["predictions"] == tokens * sum(max(layers - a, 0) for a in range(ahead)), (ahead, st)
        assert st["predicted"] == runs[1]["predicted"] and st["predicted_hits"] == runs[1]["predicted_hits"]
    for bad in (5, 100):
        with pytest.raises(EdgeMoEError, match="prefetch_layers must be within"):
            Session(artifact_int4, prefetch_layers=bad)


def test_preload_fills_the_cache_at_open_in_runs_of_adjacent_records(artifact_int4, prompt_ids, plain_tokens):
    """With room for every expert, preloading reads them all at open, 16 adjacent records a request,
    and decoding then reads nothing; a fault during the preload costs no token (the record it hit is
    read again alone, or later on demand)."""
    from edgemoe.compiler.expert_image import read_table

    n = len(read_table(artifact_int4 / "experts.bin")[1])
    for faults in (None, "corrupt@1", "eio@1*2"):
        with Session(artifact_int4, preload=True, predictor="none", inject_faults=faults) as s:
            opened = s.stats()
            assert s.generate(prompt_ids, N_NEW) == plain_tokens
            st = s.stats()
        if faults is None:
            assert opened["preloaded"] == opened["records_read"] == n, opened
            assert opened["read_requests"] == -(-n // 16), opened  # every record adjacent to the next
            assert st["records_read"] == n and st["expert_misses"] == 0, st
        else:  # the faulty run's records read again one by one; one that failed twice is read on demand
            assert opened["read_retries"] > 0 and st["records_read"] == n, (opened, st)
            assert st["expert_misses"] == n - opened["preloaded"], st


def test_preload_fills_a_smaller_cache_with_experts_the_prompt_then_finds(artifact_int4, quarter_budget, prompt_ids):
    """At a quarter of the experts the preload fills every slot, evicting nothing, with the experts
    the calibration text chose most: reading the prompt then misses less than from a cold cache."""
    misses = {}
    for preload in (False, True):
        with Session(artifact_int4, memory_budget=quarter_budget, preload=preload, predictor="none") as s:
            opened = s.stats()
            s.prefill(prompt_ids)
            misses[preload] = s.stats()["expert_misses"]
        if preload:
            assert opened["preloaded"] == opened["cache_slots"] == opened["records_read"], opened
            assert opened["read_requests"] <= opened["preloaded"] and opened["prefetch_issued"] == 0, opened
        else:
            assert opened["records_read"] == 0
    assert misses[True] < misses[False], misses


def test_fitted_router_fits_its_calibration_text(artifact_int4, quarter_budget):
    """The fitted map corrects the next layer's router towards what that layer really routes: on
    the calibration text it was fitted on it must name more of the experts than the router alone.
    (On unseen text it helps as far as the calibration text resembles it: docs/BENCHMARKS.md §4.)"""
    from conftest import CALIBRATION

    from edgemoe.compiler.profile import tokenize_file

    ids = tokenize_file(artifact_int4 / "tokenizer.json", CALIBRATION, 512).tolist()
    rates = {}
    for pred in ("next-router", "fitted-router"):
        with Session(artifact_int4, memory_budget=quarter_budget, predictor=pred, max_seq=256, prefill_tokens=1) as s:
            for i in range(0, len(ids), 256):
                s.reset()
                s.prefill(ids[i : i + 256])
            st = s.stats()
        rates[pred] = st["predicted_hits"] / st["predicted"]
    assert rates["fitted-router"] > rates["next-router"], rates


def test_guesses_two_layers_ahead_use_their_own_fit(artifact_int4, trained_model, quarter_budget):
    """A guess two layers ahead starts from the state entering the layer before: the map fitted from
    there names more of the layer's experts on held-out text than the next-layer map applied that
    early, and the runtime (prefetch_layers 2) names what NumPy names with it, up to the quantized trunk."""
    import numpy as np
    from conftest import CALIBRATION, DATA_DIR

    from edgemoe.compiler.profile import profile_routing, tokenize_file
    from edgemoe.models.reference import forward_sequence, rms_norm

    cfg = trained_model.config
    profile = profile_routing(trained_model, tokenize_file(artifact_int4 / "tokenizer.json", CALIBRATION, 4096))
    held = tokenize_file(artifact_int4 / "tokenizer.json", DATA_DIR / "wikitext-2-test.txt", 512)
    named = {"ahead": 0, "reused": 0}
    total = 0
    for i in range(0, len(held), 256):
        trace: dict = {}
        selected = forward_sequence(trained_model, held[i : i + 256], trace)[1]
        entering = [trace["embed"]] + trace["layer_out"][:-1]
        for l in range(1, cfg.num_layers):  # guessed while layer l - 1 runs its attention
            z = rms_norm(entering[l - 1], trained_model.layers[l].ffn_norm, cfg.norm_eps)
            previous = np.vstack([np.zeros((1, cfg.hidden_size)), trace["ffn_in"][l][:-1]])
            features = np.hstack([z, previous, np.ones((len(z), 1))])
            for name, fit in (("ahead", profile.fitted_ahead), ("reused", profile.fitted_router)):
                guess = np.argsort(-(features @ fit[l].T), axis=1)[:, : cfg.top_k]
                named[name] += sum(len(set(g) & set(s)) for g, s in zip(guess, selected[:, l]))
            total += selected[:, l].size
    assert named["ahead"] > named["reused"], named
    with Session(artifact_int4, memory_budget=quarter_budget, predictor="fitted-router", prefetch_layers=2,
                 max_seq=256, prefill_tokens=1) as s:
        for i in range(0, len(held), 256):
            s.reset()
            s.prefill(held[i : i + 256].tolist())
        st = s.stats()
    assert st["predicted_ahead"] == total
    assert abs(st["predicted_ahead_hits"] / st["predicted_ahead"] - named["ahead"] / total) < 0.02, (st, named)


def test_fitted_router_in_the_runtime_names_what_numpy_names(artifact_int4, trained_model, quarter_budget):
    """The runtime applies the fitted map as the compiler fitted it: to the normalised current state
    and to the layer's MoE input at the previous token (kept per layer, zero after a reset). Its hit
    rate on held-out text is the NumPy one on the same windows, up to the quantized trunk."""
    import numpy as np
    from conftest import CALIBRATION, DATA_DIR

    from edgemoe.compiler.profile import profile_routing, tokenize_file
    from edgemoe.models.reference import forward_sequence, rms_norm

    cfg = trained_model.config
    fit = profile_routing(trained_model, tokenize_file(artifact_int4 / "tokenizer.json", CALIBRATION, 4096)).fitted_router
    held = tokenize_file(artifact_int4 / "tokenizer.json", DATA_DIR / "wikitext-2-test.txt", 512)
    named = total = 0
    for i in range(0, len(held), 256):
        trace: dict = {}
        selected = forward_sequence(trained_model, held[i : i + 256], trace)[1]
        sources = [trace["embed"]] + trace["layer_out"][:-1]
        for l, layer in enumerate(trained_model.layers):
            z = rms_norm(sources[l], layer.ffn_norm, cfg.norm_eps)
            previous = np.vstack([np.zeros((1, cfg.hidden_size)), trace["ffn_in"][l][:-1]])
            scores = np.hstack([z, previous, np.ones((len(z), 1))]) @ fit[l].T
            guess = np.argsort(-scores, axis=1)[:, : cfg.top_k]
            named += sum(len(set(g) & set(s)) for g, s in zip(guess, selected[:, l]))
            total += selected[:, l].size
    with Session(artifact_int4, memory_budget=quarter_budget, predictor="fitted-router", max_seq=256,
                 prefill_tokens=1) as s:
        for i in range(0, len(held), 256):
            s.reset()
            s.prefill(held[i : i + 256].tolist())
        st = s.stats()
    assert abs(st["predicted_hits"] / st["predicted"] - named / total) < 0.02, (st, named / total)
