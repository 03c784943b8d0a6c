"""Rounding experts on every core: a pool of worker processes, each rounding whole experts.

An expert's rounding (scale search, GPTQ with calibration) is independent of every other's, so the
compile hands them out one expert per task and writes the records back in order. A task carries
the expert's weights as stored (StoredTensors travel as their file address, and the worker reads
them itself) and, with calibration, its Gram matrices; the result is the record's bytes. At most
two tasks per worker are in flight, so memory stays a few experts whatever the model's size.
Workers run their BLAS on one thread each: the pool is the parallelism. dask_pool.DaskPool runs the
same tasks, behind the same interface, on a Dask cluster.
"""
from __future__ import annotations

import hashlib
import multiprocessing
import os
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from .expert_image import ExpertWeights, record_payload
from .quantize import quantize

# Environment variables that size the BLAS thread pools of the libraries NumPy may be built with.
BLAS_THREADS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")
IN_FLIGHT_PER_JOB = 2

# The sources whose code decides the bytes of an expert record: a resumed compile keeps records only
# when these are unchanged (as well as the checkpoint, the texts and the options), and a remote
# worker rounds only when its copy of them is this one.
RECORD_SOURCES = ("rounding.py", "llamacpp_rounding.py", "quantize.py", "expert_image.py", "expert_pool.py", "layer_pass.py", "profile.py",
                  "../models/reference.py", "../models/stored_tensor.py", "../models/gguf_import.py")


def record_code_digest() -> bytes:
    """SHA-256 of RECORD_SOURCES as this installation of EdgeMoE has them."""
    h = hashlib.sha256()
    for name in RECORD_SOURCES:
        h.update((Path(__file__).parent / name).read_bytes())
    return h.digest()


class RoundingLost(RuntimeError):
    """The workers lost tasks in flight (a cluster's worker or scheduler went away): the compile
    stops as an interrupted one does, keeping its finished records for the same command to resume."""


@dataclass
class RoundingTask:
    """One expert to round: its three matrices (gate, up, down: arrays or LazyTensors), the
    bitwidth (INT4 on `grid`), and per matrix the Gram matrix of its calibration inputs (or None)."""

    layer: int
    expert: int
    weights: tuple
    bits: int
    group: int
    layout: str
    grams: tuple = (None, None, None)
    grid: str = "half"


@dataclass
class RoundedExpert:
    layer: int
    expert: int
    bits: int
    payload: bytes  # the record's bytes (expert_image.record_payload)
    part_offsets: list[int]


def round_expert(task: RoundingTask) -> RoundedExpert:
    """The record of one expert (quantize.py, rounding.py), in this process."""
    stored = ExpertWeights(*(None if w is None else quantize(w, task.bits, task.group, task.layout, g, task.grid)
                             for w, g in zip(task.weights, task.grams)))  # gate None: a ReLU expert
    payload, offsets = record_payload(stored)
    return RoundedExpert(task.layer, task.expert, task.bits, payload, offsets)


# A worker is a fresh interpreter importing NumPy, SciPy and numba: a pool of two took ~6.5 s to
# start on this project's 2-core machine, so it pays only where rounding in the compile's own process
# would take longer than POOL_MIN_SECONDS. Rates measured there in this process: the scale search
# ~13 M expert weights/s, rounding against calibration inputs (GPTQ, BLAS on every core) ~0.6 M/s.
# (The bundled model's 11.8 M weights: 2.8 s against 9.1 s with the pool; calibrated, 20 s either way;
# a 100 M-weight model, 9.8 s against 10.0 s.)
POOL_MIN_SECONDS = 15.0
ROUNDING_RATE = {False: 13e6, True: 0.6e6}  # expert weights/s in one process, by calibrated


def default_jobs(expert_weights: int | None = None, calibrated: bool = False) -> int:
    """Worker processes when not told: one per core this process may run on; 1 (round in this
    process) where rounding `expert_weights` here would take under POOL_MIN_SECONDS."""
    if expert_weights is not None and expert_weights / ROUNDING_RATE[calibrated] < POOL_MIN_SECONDS:
        return 1
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class ExpertPool:
    """`jobs` worker processes (1: round in this process, no pool); a context manager."""

    def __init__(self, jobs: int):
        if jobs < 1:
            raise ValueError(f"jobs must be at least 1, not {jobs}")
        self.jobs = jobs
        self.where = f"{jobs} process{'es' if jobs > 1 else ''}"  # for the compile log and manifest
        self._pool = None
        self._saved_env = {}

    def __enter__(self) -> "ExpertPool":
        if self.jobs > 1:
            # workers are spawned (a fresh interpreter: fork would copy this process's threads' locks)
            # and read these variables as they start, during the pool's life
            self._saved_env = {k: os.environ.get(k) for k in BLAS_THREADS}
            os.environ.update({k: "1" for k in BLAS_THREADS})
            self._pool = ProcessPoolExecutor(self.jobs, mp_context=multiprocessing.get_context("spawn"))
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            for k, v in self._saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            self._pool = None

    def run(self, tasks: Iterable, work=round_expert) -> Iterator:
        """work(task) for each task (a module-level function: workers import it), in the tasks'
        order; tasks are drawn from the iterable only as workers free up (it may compute each one,
        e.g. its Gram matrices, when drawn)."""
        if self._pool is None:
            yield from map(work, tasks)
            return
        pending: deque[Future] = deque()
        for task in tasks:
            pending.append(self._pool.submit(work, task))
            while len(pending) >= IN_FLIGHT_PER_JOB * self.jobs:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
