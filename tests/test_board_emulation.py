"""Board-faithful compute timing (runtime_c/src/pacer.h): every kernel lasts at least as long as the
emulated board's memory bandwidth and throughput allow, the tokens never change, and bad figures are
refused by name."""
import pytest

from edgemoe.runtime import EdgeMoEError, Session, budget_bytes
from edgemoe.targets import available, load_target

from conftest import PROMPTS

N_NEW = 16


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    return tokenizer.encode(PROMPTS[0]).ids


def _decode(artifact, prompt_ids, **options):
    with Session(artifact, **options) as s:
        before = s.stats()
        tokens = s.generate(prompt_ids, N_NEW)
        after = s.stats()
        return tokens, {k: after[k] - before[k] for k in ("tokens", "compute_ns", "board_wait_ns")}, s.info, after


def test_a_paced_decode_lasts_at_least_the_boards_memory_time_and_keeps_the_tokens(artifact_int4, prompt_ids):
    plain, plain_st, _, _ = _decode(artifact_int4, prompt_ids, loader_thread=False)
    assert plain_st["board_wait_ns"] == 0
    bandwidth = 50e6  # a board far slower than this host: its time dominates every kernel
    paced, st, info, after = _decode(artifact_int4, prompt_ids, loader_thread=False,
                                     emulate_compute=(bandwidth, 1e12, 1e12))
    assert paced == plain
    # each token runs every expert layer's top-k experts: at least their weights cross the board's memory
    expert_bytes = info["num_expert_layers"] * info["top_k"] * after["record_bytes"] * 0.9
    assert st["compute_ns"] >= st["tokens"] * expert_bytes / bandwidth * 1e9
    assert 0 < st["board_wait_ns"] <= st["compute_ns"]


def test_throughput_bounds_a_kernel_too(artifact_int4, prompt_ids):
    """A board with ample memory bandwidth but little arithmetic is paced by its operations: two per
    weight of the top-k experts' matrices."""
    ops = 1e9
    _, st, info, after = _decode(artifact_int4, prompt_ids, loader_thread=False, emulate_compute=(1e15, ops, ops))
    weights = info["num_expert_layers"] * info["top_k"] * after["record_bytes"] * 0.9 * 2  # ≥ 2 INT4 weights a byte
    assert st["compute_ns"] >= st["tokens"] * 2 * weights / ops * 1e9 * 0.5  # scales take part of a record


def test_pacing_with_expert_reads_in_flight_keeps_the_tokens(artifact_int4, prompt_ids):
    budget = budget_bytes(artifact_int4, 0, 0.25)
    rpi4 = load_target("rpi4")
    plain, _, _, _ = _decode(artifact_int4, prompt_ids, memory_budget=budget, predictor="fitted-router")
    paced, st, _, _ = _decode(artifact_int4, prompt_ids, memory_budget=budget, predictor="fitted-router",
                              emulate=(45e6, 1e-3), emulate_compute=rpi4.compute_emulation())
    assert paced == plain and st["board_wait_ns"] > 0


@pytest.mark.parametrize("figures", [(1e9, 0.0, 1e9), (-1.0, 1e9, 1e9), (1e9, float("nan"), 1e9),
                                     (1e9, 1e9, float("inf"))])
def test_bad_board_figures_are_refused_by_name(artifact_int4, figures):
    with pytest.raises(EdgeMoEError, match="emulate_memory_bandwidth, emulate_int8_ops and emulate_fp32_flops"):
        Session(artifact_int4, emulate_compute=figures)


def test_every_board_with_storage_cites_its_compute_figures():
    """The storage-emulating boards (Linux and Android ones) carry compute figures with their sources."""
    boards = [load_target(n) for n in available()]
    emulated = [t for t in boards if t.os in ("linux", "android") and t.storage.get("read_bandwidth_bytes_per_s")
                and t.tvm_target.get("mtriple", "").startswith("aarch64")]
    assert {t.name for t in emulated} >= {"rpi4", "rpi5", "phone-ufs31", "emmc-board"}
    for t in emulated:
        bandwidth, int8, fp32 = t.compute_emulation()
        assert 1e8 < bandwidth < 1e12 and 1e9 < fp32 <= int8 < 1e13, t.name
        assert len(t.compute["sources"]) >= 2 and all(isinstance(s, str) and s for s in t.compute["sources"])
