"""Bounds an expert-cache policy is measured against (issue #15): Belady's MIN on the routing trace
the runtime recorded, the runtime's own eviction policies replayed on it knowing a given stretch of
the future exactly, and the time a perfect pipeline would take for a given number of reads.

The trace is [tokens, layers, top_k] expert ids (Session.routing_trace). A layer's top_k experts
must be resident together when it runs (the runtime pins them), so MIN here evicts, on a miss, the
resident expert outside the current layer's set whose next use lies farthest ahead (never used
again first): the fewest reads any cache of that many slots could do, knowing the future.
"""
from __future__ import annotations

from collections import deque

import numpy as np

# The runtime's EdgeMoE score (runtime_c/src/expert_cache.h EM_USAGE_DECAY, EM_PROFILE_WEIGHT);
# tests/test_cache_bound.py checks the replay below reads what the runtime reads.
USAGE_DECAY = np.float32(0.95)
PROFILE_WEIGHT = 0.3
POLICIES = ("lru", "edgemoe")


def _layer_steps(trace: np.ndarray, slots: int) -> tuple[list[tuple[int, list]], dict]:
    """The trace as layer steps (layer, its (layer, expert) items in routing order) and each item's
    step indices, the slot count checked against a layer's experts."""
    tokens, layers, top_k = trace.shape
    if slots < top_k:
        raise ValueError(f"{slots} slots cannot hold one layer's {top_k} experts")
    steps = [(l, [(l, int(e)) for e in trace[t, l]]) for t in range(tokens) for l in range(layers)]
    uses: dict[tuple[int, int], deque] = {}
    for i, (_, step) in enumerate(steps):
        for item in step:
            uses.setdefault(item, deque()).append(i)
    return steps, uses


def replay_misses(trace: np.ndarray, slots: int, policy: str, frequency: np.ndarray | None = None,
                  horizon: int = 0, first_token: int = 0) -> int:
    """Reads the runtime's eviction `policy` ("lru", or "edgemoe" with the profile's `frequency`
    [layers, experts]) does for the trace with `slots` slots, demand loads only, counted from token
    `first_token` on, as expert_cache.c decides: a layer's experts are looked up in routing order,
    each pinned once resident; a miss takes a free slot, else the first unpinned slot of the highest
    score. With `horizon` > 0 the policy also knows the next `horizon` layer steps exactly: a resident
    expert used within them is kept over every one that is not, and among those the one used last
    goes first (MIN's rule). horizon 1 is a perfect next-layer predictor's knowledge, `layers` one
    whole token's, and a horizon past the trace's end is MIN itself. Each miss scores every slot at
    once (arrays per slot), so a replay of a 1,024-expert model's trace takes seconds."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}: one of {', '.join(POLICIES)}")
    if policy == "edgemoe" and frequency is None:
        raise ValueError("the edgemoe policy needs the routing profile's expert frequency")
    steps, uses = _layer_steps(trace, slots)
    layers = trace.shape[1]
    experts = int(trace.max()) + 1 if frequency is None else frequency.shape[1]
    usage = np.zeros((layers, experts), np.float32)
    profile = None if frequency is None else PROFILE_WEIGHT * np.asarray(frequency, np.float64)
    held_layer = np.zeros(slots, np.int64)
    held_expert = np.zeros(slots, np.int64)
    used_at = np.zeros(slots, np.int64)
    next_use = np.full(slots, np.inf)  # the layer step of the held expert's next use
    pinned = np.zeros(slots, bool)
    where: dict[tuple[int, int], int] = {}
    filled = clock = misses = 0
    for i, (layer, step) in enumerate(steps):
        pinned[:] = False
        for item in step:
            uses[item].popleft()
            clock += 1
            j = where.get(item)
            if j is None:
                misses += i >= first_token * layers
                if filled < slots:
                    j, filled = filled, filled + 1
                else:
                    j = _victim(policy, i, layer, layers, horizon, held_layer, held_expert, used_at, next_use, pinned,
                                profile, usage)
                    del where[(int(held_layer[j]), int(held_expert[j]))]
                where[item] = j
                held_layer[j], held_expert[j] = item
            used_at[j] = clock
            next_use[j] = uses[item][0] if uses[item] else np.inf
            pinned[j] = True
        usage[layer] *= USAGE_DECAY
        for _, e in step:
            usage[layer, e] += np.float32(1) - USAGE_DECAY
    return misses


def _victim(policy, i, layer, layers, horizon, held_layer, held_expert, used_at, next_use, pinned, profile, usage) -> int:
    """The slot replay_misses evicts: among unpinned slots, one whose expert is used beyond the
    horizon (or never again) before any used within it; among the former the policy's highest score,
    among the latter the one used last; the first such slot on ties."""
    soon = next_use - i <= horizon if horizon else np.zeros(len(pinned), bool)
    later = ~pinned & ~soon
    if later.any():
        if policy == "lru":
            score = -used_at.astype(np.float64)
        else:
            p = np.maximum(profile[held_layer, held_expert] + (1 - PROFILE_WEIGHT) *
                           usage[held_layer, held_expert].astype(np.float64), 1e-6)
            d = (held_layer - layer) % layers
            d[d == 0] = layers
            score = d + layers * (1 - p) / p
        return int(np.argmax(np.where(later, score, -np.inf)))
    return int(np.argmax(np.where(~pinned, next_use - i, -np.inf)))


def belady_misses(trace: np.ndarray, slots: int, first_token: int = 0, prefilled: bool = False) -> int:
    """Reads Belady's MIN does for the trace with `slots` expert slots (all records one size), counted
    from token `first_token` on (MIN run over the whole trace, the earlier tokens' reads left out of
    the count: e.g. decode after a prompt).
    `prefilled`: the cache starts full, for free, with the experts first used soonest (MIN's own
    choice): the bound for a runtime that preloads its cache at open."""
    steps, uses = _layer_steps(trace, slots)
    layers = trace.shape[1]
    resident: set[tuple[int, int]] = set()
    if prefilled:
        first_use = sorted(uses, key=lambda item: uses[item][0])
        resident = set(first_use[:slots])
    misses = 0
    for i, (_, step) in enumerate(steps):
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
