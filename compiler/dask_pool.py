"""Rounding experts on a Dask cluster, for models one machine cannot round in reasonable time.

The same interface as expert_pool.ExpertPool (a context manager whose `run` turns RoundingTasks into
RoundedExperts, in order, drawing tasks only as workers free up: at most two per worker thread in
flight), over an existing Dask scheduler (`dask scheduler`, `dask worker ADDRESS --nthreads 1`, or
any Dask deployment). The scheduler and every worker need this EdgeMoE installed (the scheduler
unpickles the tasks, the workers run them; their rounding code is compared with this machine's)
and must be able to read the checkpoint at the same absolute path as this machine: a task's
weights travel as file addresses (StoredTensor, GGUFTensor) and each worker reads its expert itself, so the
checkpoint lives on storage they share (NFS, a cluster file system, or a copy at the same path).
Gram matrices (with calibration) travel as data, straight to a worker. Dask is an optional
dependency: `pip install edgemoe[distributed]`.
"""
from __future__ import annotations

import os
from collections import deque
from typing import Iterable, Iterator

from ..models.stored_tensor import FileTensor
from .expert_pool import IN_FLIGHT_PER_JOB, RoundedExpert, RoundingLost, RoundingTask, record_code_digest, round_expert


class DaskPool:
    """Experts rounded on the workers of the Dask scheduler at `address` (HOST:PORT or a URL such
    as tcp://HOST:PORT); a context manager that connects on entry and checks the cluster can round."""

    def __init__(self, address: str):
        try:
            import distributed  # noqa: F401 (only whether it is there)
        except ImportError:
            raise ValueError("rounding on a Dask cluster (--dask-scheduler) needs Dask: "
                             "pip install edgemoe[distributed]") from None
        self.address = address
        self.where = f"dask scheduler {address}"  # completed on entry
        self._client = None
        self._readable: set[str] = set()  # checkpoint files every worker was seen to read

    def __enter__(self) -> "DaskPool":
        import dask
        from distributed import Client

        timeout = dask.config.get("distributed.comm.timeouts.connect")
        try:
            # not the default client: a compile inside a user's own Dask session leaves theirs alone
            self._client = Client(self.address, set_as_default=False)
        except (OSError, TimeoutError) as e:
            raise ValueError(f"cannot reach the Dask scheduler at {self.address} within {timeout} ({e}); start one "
                             f"there (`dask scheduler`, then `dask worker {self.address}` on each machine), check the "
                             "address and firewall, or compile without --dask-scheduler (raise the wait with "
                             "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT)") from None
        try:
            self._check_cluster(timeout)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self._client is not None:
            self._client.close()  # the scheduler forgets whatever was still in flight
            self._client = None

    def _check_cluster(self, timeout) -> None:
        """Workers are there, and the scheduler and each worker run this machine's rounding code."""
        client, here = self._client, record_code_digest()
        try:
            client.wait_for_workers(1, timeout=timeout)
        except TimeoutError:
            raise ValueError(f"the Dask scheduler at {self.address} has no workers; start some "
                             f"(`dask worker {self.address} --nthreads 1`)") from None
        try:
            theirs = {"the scheduler": client.run_on_scheduler(record_code_digest)}
        except Exception as e:  # what unpickling a function it cannot import raises there
            theirs = {"the scheduler": e}
        theirs.update(client.run(record_code_digest, on_error="return"))
        lacking = [f"{who} ({v})" for who, v in theirs.items() if isinstance(v, BaseException)]
        if lacking:
            raise ValueError(f"Dask cluster {self.address}: {', '.join(lacking)} cannot run EdgeMoE's rounding code; "
                             "install EdgeMoE (this version) in the scheduler's and workers' Python environments")
        other = [who for who, v in theirs.items() if v != here]
        if other:
            raise ValueError(f"Dask cluster {self.address}: {', '.join(other)} run(s) different EdgeMoE rounding code "
                             "from this machine's, so would write other bytes; install this version there")
        threads = client.nthreads()
        self.where = (f"dask scheduler {client.scheduler.address} with {len(threads)} worker"
                      f"{'s' if len(threads) != 1 else ''} ({sum(threads.values())} threads)")

    def _check_readable(self, task: RoundingTask) -> None:
        """Every worker can read the files the task's weights lie in (checked once per file)."""
        for path in {str(w.path) for w in task.weights if isinstance(w, FileTensor)} - self._readable:
            cannot = [w for w, ok in self._cluster(self._client.run, os.access, path, os.R_OK).items() if not ok]
            if cannot:
                raise ValueError(f"Dask worker(s) {', '.join(sorted(cannot))} cannot read the checkpoint file {path}: "
                                 "workers read the experts themselves at this machine's path, so the checkpoint must "
                                 "be on storage they share at the same path")
            self._readable.add(path)

    def run(self, tasks: Iterable[RoundingTask]) -> Iterator[RoundedExpert]:
        """The tasks' results in the tasks' order; tasks are drawn from the iterable only as workers
        free up, so the Gram matrices and results held stay a few experts' worth."""
        pending: deque = deque()  # (layer, expert, future)
        for task in tasks:
            self._check_readable(task)
            pending.append((task.layer, task.expert, self._submit(task)))
            # workers may join or leave during the compile: the bound follows them
            while len(pending) >= IN_FLIGHT_PER_JOB * max(1, sum(self._cluster(self._client.nthreads).values())):
                yield self._result(*pending.popleft())
        while pending:
            yield self._result(*pending.popleft())

    def _submit(self, task: RoundingTask):
        # scattered first: the task's data goes to a worker, not into the scheduler's graph; the
        # submitted task holds it until its result is taken
        data = self._cluster(self._client.scatter, task, hash=False)
        return self._cluster(self._client.submit, round_expert, data, pure=False)

    def _cluster(self, call, *args, **kwargs):
        """call(*args, **kwargs); a connection in the cluster failing (to the scheduler, or from it to the
        worker it hands a task to) is RoundingLost."""
        try:
            return call(*args, **kwargs)
        except OSError as e:  # CommClosedError and timeouts among them
            raise RoundingLost(f"Dask cluster {self.address} lost a connection ({type(e).__name__}: {e})") from e

    def _result(self, layer: int, expert: int, future) -> RoundedExpert:
        from distributed import KilledWorker

        try:
            return future.result()
        except Exception as e:
            if future.status == "error" and not isinstance(e, KilledWorker):
                raise  # the rounding itself failed: the worker's exception and traceback
            # a worker died holding the task's data or result (a scattered task cannot be recomputed
            # elsewhere), or the task killed workers repeatedly, or the scheduler went away
            raise RoundingLost(f"Dask cluster {self.address} lost the rounding of layer {layer} expert {expert} "
                               f"({type(e).__name__}: {e})") from e
