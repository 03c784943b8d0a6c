"""Experts rounded on a Dask cluster (--dask-scheduler): a real local cluster of two worker
processes writes the records the local pool writes; a cluster that cannot round is refused with
what to do."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from edgemoe.cli import compile_cmd
from edgemoe.compiler.dask_pool import DaskPool
from edgemoe.compiler.driver import CompileOptions, compile_model
from edgemoe.compiler.expert_pool import RoundingLost, RoundingTask, round_expert

from conftest import CALIBRATION, records

distributed = pytest.importorskip("distributed", reason="Dask is an optional extra: pip install edgemoe[distributed]")


@pytest.fixture(scope="module")
def cluster():
    """A scheduler and two single-threaded worker processes on this machine."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=":0") as c:
        yield c


# the compiles compared: rounding against searched scales, and calibrated (GPTQ) rounding
OPTIONS = {"scales": CompileOptions(max_seq=64, jobs=2),
           "calibrated": CompileOptions(calibration=CALIBRATION, calibration_tokens=600, max_seq=64, jobs=2)}


@pytest.fixture(scope="module")
def local(tiny_with_tokenizer, tmp_path_factory):
    """The artifacts of OPTIONS compiled on the local pool of two processes."""
    out = {}
    for name, opts in OPTIONS.items():
        out[name] = tmp_path_factory.mktemp(f"local_{name}")
        compile_model(tiny_with_tokenizer, out[name], opts, log=lambda m: None)
    return out


@pytest.mark.parametrize("name", OPTIONS)
def test_a_dask_cluster_writes_the_local_pool_s_records(name, cluster, local, tiny_with_tokenizer, tmp_path):
    lines = []
    manifest = compile_model(tiny_with_tokenizer, tmp_path / "dask",
                             replace(OPTIONS[name], dask_scheduler=cluster.scheduler_address), log=lines.append)
    assert records(tmp_path / "dask") == records(local[name])
    where = f"dask scheduler {cluster.scheduler_address} with 2 workers (2 threads)"
    assert manifest["experts"]["rounded_on"] == where
    assert json.loads((local[name] / "manifest.json").read_text())["experts"]["rounded_on"] == "2 processes"
    assert any(line.startswith("rounded 8 experts") and f"on {where} in" in line for line in lines), lines


def test_workers_lost_mid_compile_stop_it_and_the_same_command_resumes(cluster, local, tiny_with_tokenizer, tmp_path):
    """Both workers killed after the first record: the tasks in flight are lost with them (scattered
    data has no other copy) and the next cannot be handed out; the compile stops as an interrupted one, keeping what it finished, and
    run again on the restarted workers resumes to the uninterrupted compile's records."""
    opts = replace(OPTIONS["scales"], dask_scheduler=cluster.scheduler_address)
    with distributed.Client(cluster, set_as_default=False) as client:

        def kill_workers_after_the_first(iterable, desc, **_):
            for i, item in enumerate(iterable):
                yield item
                if desc == "rounding experts" and i == 0:
                    for pid in client.run(os.getpid).values():
                        os.kill(pid, signal.SIGKILL)

        lines = []
        # whichever comes first: a result lost, or a task scattered to a dying worker
        with pytest.raises(RoundingLost, match=f"Dask cluster {cluster.scheduler_address} lost"):
            compile_model(tiny_with_tokenizer, tmp_path / "dask", opts, log=lines.append,
                          progress=kill_workers_after_the_first)
        assert lines[-1].startswith("stopped:") and (tmp_path / ".dask.partial").is_dir()
        client.wait_for_workers(2, timeout=60)  # the nannies restart them
    lines = []
    compile_model(tiny_with_tokenizer, tmp_path / "dask", opts, log=lines.append)
    assert any(line.startswith("resuming: ") for line in lines), lines
    assert records(tmp_path / "dask") == records(local["scales"])
    assert not (tmp_path / ".dask.partial").exists()


def test_tasks_are_drawn_as_workers_free_up_and_come_back_in_order(cluster):
    """At most two tasks per worker thread are out at once (RAM holds a few experts, not the model's),
    and the results are the tasks' own, in the tasks' order."""
    rng = np.random.default_rng(7)
    tasks = [RoundingTask(i // 4, i % 4, tuple(rng.standard_normal((32, 64), np.float32) for _ in range(3)), 4, 32,
                          "rows") for i in range(16)]
    drawn, ahead = [], []

    def draw():
        for t in tasks:
            drawn.append(t)
            yield t

    with DaskPool(cluster.scheduler_address) as pool:
        got = []
        for r in pool.run(draw()):
            got.append(r)
            ahead.append(len(drawn) - len(got))
    assert max(ahead) <= 2 * 2 and len(got) == len(tasks)
    for r, t in zip(got, tasks):
        want = round_expert(t)
        assert (r.layer, r.expert, r.payload, r.part_offsets) == (t.layer, t.expert, want.payload, want.part_offsets)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_scheduler_is_named(tiny_mixtral_dir, tmp_path):
    import dask
    from click.testing import CliRunner

    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        result = CliRunner().invoke(compile_cmd, [str(tiny_mixtral_dir), "-o", str(tmp_path / "out"), "--max-seq",
                                                  "64", "--dask-scheduler", address])
    assert result.exit_code == 1, result.output
    assert f"cannot reach the Dask scheduler at {address}" in result.output and "dask scheduler" in result.output
    assert not (tmp_path / "out").exists()
    result = CliRunner().invoke(compile_cmd, [str(tiny_mixtral_dir), "-o", str(tmp_path / "out"), "--jobs", "2",
                                              "--dask-scheduler", address])
    assert result.exit_code == 2 and "exclude each other" in result.output, result.output


def test_a_worker_without_edgemoe_is_named(tiny_mixtral_dir, tmp_path):
    """A worker whose Python cannot import edgemoe (made so by a None in sys.modules) is refused by
    address before any expert is sent."""
    with distributed.LocalCluster(n_workers=0, host="127.0.0.1", dashboard_address=":0") as c:
        worker = subprocess.Popen(
            [sys.executable, "-c", "import sys; sys.modules['edgemoe'] = None\n"
             "from distributed.cli.dask_worker import main; main()",
             c.scheduler_address, "--no-nanny", "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            with distributed.Client(c.scheduler_address, set_as_default=False) as client:
                client.wait_for_workers(1, timeout=60)
                (address,) = client.nthreads()
            with pytest.raises(ValueError, match=f"{address} .*No module named .*install EdgeMoE"):
                compile_model(tiny_mixtral_dir, tmp_path / "out",
                              CompileOptions(max_seq=64, dask_scheduler=c.scheduler_address), log=lambda m: None)
        finally:
            worker.kill()
            worker.wait()
    assert not (tmp_path / "out").exists()
