"""Bounds an expert-cache policy is measured against (issue #15): Belady's MIN on the routing trace
the runtime recorded, and the time a perfect pipeline would take for a given number of reads.

The trace is [tokens, layers, top_k] expert ids (Session.routing_trace). A layer's top_k experts
must be resident together when it runs (the runtime pins them), so MIN here evicts, on a miss, the
resident expert outside the current layer's set whose next use lies farthest ahead (never used
again first): the fewest reads any cache of that many slots could do, knowing the future.
"""
from __future__ import annotations

from collections import deque

import numpy as np


def belady_misses(trace: np.ndarray, slots: int, first_token: int = 0) -> int:
    """Reads Belady's MIN does for the trace with `slots` expert slots (all records one size), counted
    from token `first_token` on (the cache filled optimally before it: e.g. decode after a prompt)."""
    tokens, layers, top_k = trace.shape
    if slots < top_k:
        raise ValueError(f"{slots} slots cannot hold one layer's {top_k} experts")
    steps = [[(l, int(e)) for e in trace[t, l]] for t in range(tokens) for l in range(layers)]
    uses: dict[tuple[int, int], deque] = {}
    for i, step in enumerate(steps):
        for item in step:
            uses.setdefault(item, deque()).append(i)
    resident: set[tuple[int, int]] = set()
    misses = 0
    for i, step in enumerate(steps):
        needed = set(step)
        for item in step:
            uses[item].popleft()
        for item in needed - resident:
            misses += i >= first_token * layers
            if len(resident) >= slots:
                victim = max(resident - needed, key=lambda r: uses[r][0] if uses[r] else float("inf"))
                resident.remove(victim)
            resident.add(item)
    return misses


def time_bound_ms(compute_ms: float, requests_per_token: float, bytes_per_token: float, bandwidth: float,
                  latency_s: float, queue_depth: int) -> float:
    """A token's time with perfect overlap: the larger of its compute and its reads' I/O time (bytes ÷
    bandwidth, plus each request's latency divided among the requests the device overlaps; a request
    reads one record or a run of adjacent ones)."""
    io_s = bytes_per_token / bandwidth + requests_per_token * latency_s / max(queue_depth, 1) if bandwidth else 0.0
    return max(compute_ms, io_s * 1e3)
