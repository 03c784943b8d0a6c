"""Belady's MIN over routing traces: exact on hand-checked sequences, never above any real policy."""
import itertools

import numpy as np
import pytest

from edgemoe.cache_bound import belady_misses, replay_misses, time_bound_ms


def brute_force_min(trace, slots):
    """The fewest misses over every eviction choice (exponential: tiny traces only)."""
    steps = [[(l, int(e)) for e in trace[t, l]] for t in range(trace.shape[0]) for l in range(trace.shape[1])]

    def best(i, resident):
        if i == len(steps):
            return 0
        needed = set(steps[i])
        missing = needed - resident
        if len(resident | missing) <= slots:
            return len(missing) + best(i + 1, frozenset(resident | missing))
        free = slots - len(needed)
        keep_from = sorted(resident - needed)
        return len(missing) + min(best(i + 1, frozenset(needed | set(kept)))
                                  for kept in itertools.combinations(keep_from, min(free, len(keep_from))))

    return best(0, frozenset())


def lru_misses(trace, slots):
    order, misses = [], 0
    for t in range(trace.shape[0]):
        for l in range(trace.shape[1]):
            step = [(l, int(e)) for e in trace[t, l]]
            for item in step:
                if item in order:
                    order.remove(item)
                else:
                    misses += 1
                    while len(order) >= slots:
                        victim = next(o for o in order if o not in step)
                        order.remove(victim)
                order.append(item)
    return misses


def test_textbook_sequence():
    # one layer, top-1, 2 slots: a b c(evict b, next used later than a) a b(evict c, never again)
    # d(evict b) a b: six misses
    seq = np.array([0, 1, 2, 0, 1, 3, 0, 1], np.uint32).reshape(-1, 1, 1)
    assert belady_misses(seq, 2) == brute_force_min(seq, 2) == 6
    assert belady_misses(seq, 4) == 4  # only compulsory misses
    assert belady_misses(seq, 2, first_token=3) == 3  # b, d, b after the first three


def test_equals_exhaustive_search_and_never_exceeds_lru(rng):
    for _ in range(12):
        tokens, layers, experts, top_k = 5, 2, 4, 2
        trace = np.stack([np.stack([rng.choice(experts, top_k, replace=False) for _ in range(layers)])
                          for _ in range(tokens)]).astype(np.uint32)
        for slots in (2, 3, 5):
            m = belady_misses(trace, slots)
            assert m == brute_force_min(trace, slots)
            assert m <= lru_misses(trace, slots)


def test_too_few_slots_is_refused():
    with pytest.raises(ValueError, match="1 slots cannot hold one layer's 2 experts"):
        belady_misses(np.zeros((1, 1, 2), np.uint32), 1)


def test_time_bound():
    # 2 reads of 1 MB at 100 MB/s with 1 ms latency and a queue of 2: 20 ms + 1 ms
    assert time_bound_ms(5.0, 2, 2e6, 1e8, 1e-3, 2) == pytest.approx(21.0)
    assert time_bound_ms(50.0, 2, 2e6, 1e8, 1e-3, 2) == 50.0


@pytest.mark.parametrize("policy", ["lru", "edgemoe"])
@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_the_replay_reads_what_the_runtime_reads(artifact_int4, rng, policy, fraction):
    """Replayed on the routing the runtime recorded, the runtime's eviction policy (demand loads only,
    the tokens fed one by one) misses exactly as often as the runtime did; told the whole future it is
    MIN."""
    from edgemoe.compiler.program import PROFILE_TENSORS
    from edgemoe.compiler.trunk_file import read_float_tensor
    from edgemoe.runtime import Session, budget_bytes

    frequency = read_float_tensor(artifact_int4 / "trunk.bin", PROFILE_TENSORS["frequency"])
    with Session(artifact_int4, memory_budget=budget_bytes(artifact_int4, 256, fraction), max_seq=256,
                 loader_thread=False, predictor="none", eviction=policy, prefill_tokens=1) as s:
        tokens = rng.integers(0, s.info["vocab_size"], 160).tolist()
        s.trace_routing(len(tokens))
        s.prefill(tokens)
        st, trace = s.stats(), s.routing_trace()
    assert st["expert_misses"] > 0
    assert replay_misses(trace, st["cache_slots"], policy, frequency) == st["expert_misses"]
    assert replay_misses(trace, st["cache_slots"], policy, frequency, horizon=trace.size) == \
        belady_misses(trace, st["cache_slots"]) < st["expert_misses"]


def test_knowing_more_of_the_future_never_reads_more_than_min(rng):
    trace = np.stack([np.stack([rng.choice(16, 4, replace=False) for _ in range(3)]) for _ in range(60)])
    frequency = np.full((3, 16), 0.25, np.float32)
    floor = belady_misses(trace, 12)
    for policy in ("lru", "edgemoe"):
        for horizon in (0, 1, 3, 12):
            assert replay_misses(trace, 12, policy, frequency, horizon) >= floor
    # a free prefill saves at most a load per slot, and at least the first layer's cold misses
    assert floor - 12 <= belady_misses(trace, 12, prefilled=True) <= floor - 4


def test_replay_refuses_what_it_cannot_replay():
    trace = np.zeros((1, 1, 2), np.uint32)
    with pytest.raises(ValueError, match="unknown policy 'fifo'"):
        replay_misses(trace, 4, "fifo")
    with pytest.raises(ValueError, match="needs the routing profile"):
        replay_misses(trace, 4, "edgemoe")
    with pytest.raises(ValueError, match="1 slots cannot hold"):
        replay_misses(trace, 1, "lru")


def test_lookahead_bench_prints_every_policy_beside_min(artifact_int4):
    """edgemoe-bench lookahead on held-out text: every replayed policy reads at least MIN's reads, and
    told more of the future than the trace holds reads exactly MIN's."""
    from click.testing import CliRunner

    from edgemoe.bench import bench_cmd
    from edgemoe.runtime import REPO_ROOT

    r = CliRunner().invoke(bench_cmd, ["lookahead", str(artifact_int4), "--text",
                                       str(REPO_ROOT / "data" / "wikitext-2-test.txt"), "--tokens", "96",
                                       "--window", "48", "--fractions", "0.5", "--horizons", "1,100001"])
    assert r.exit_code == 0, r.output
    rows = [line.split(" | ") for line in r.output.splitlines() if line.startswith("| 50%")]
    assert [(row[2], row[3]) for row in rows] == [
        ("Belady's MIN", "everything"), ("LRU", "nothing"), ("LRU", "1 layer step"), ("LRU", "100001 layer steps"),
        ("EdgeMoE eviction", "nothing"), ("EdgeMoE eviction", "1 layer step"),
        ("EdgeMoE eviction", "100001 layer steps"), ("EdgeMoE eviction, hindsight frequency", "nothing")]
    ratios = [float(row[5].rstrip(" |")) for row in rows]
    assert min(ratios) == 1.0 and ratios[3] == ratios[6] == 1.0 and ratios[1] > 1.0, r.output
