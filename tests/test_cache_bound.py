"""Belady's MIN over routing traces: exact on hand-checked sequences, never above any real policy."""
import itertools

import numpy as np
import pytest

from edgemoe.cache_bound import belady_misses, time_bound_ms


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
