"""Where tuning candidates are timed. Candidates are always built here, by TVM for the target; what
differs is the machine that runs them:

* `Local`: this machine (the target must be its architecture);
* `Remote`: boards behind `tvm.rpc`: one RPC server (`--rpc HOST:PORT`), or every board a tracker
  lists under a key (`--rpc-tracker HOST:PORT --rpc-key KEY`), each board timing other kernels in
  parallel. Each kernel's candidates are one shared library (linked with the target's compiler),
  uploaded and loaded by the board's server;
* `MinRPC`: a board without Python: TVM's minimal RPC server (`tvm.rpc.with_minrpc`) linked with
  all candidates as its system library, for the board's architecture, started through a launcher
  (qemu-user here; on a board, e.g. ssh) as a popen session.

Every measurer returns seconds per call for each candidate (best of `repeat` runs of `number`
calls, on random arguments) and a description of where they were measured, kept in the records.
"""
from __future__ import annotations

import os
import queue
import shlex
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tvm
from tvm import rpc

from ..targets import TargetDesc, toolchain
from .schedules import schedule


class MeasureError(RuntimeError):
    pass


@dataclass(frozen=True)
class Candidate:
    kernel: str  # the decode kernel's symbol
    func: tvm.tirx.PrimFunc
    lanes: int

    @property
    def symbol(self) -> str:
        return f"{self.kernel}__lanes{self.lanes}"


def candidate_module(cands: list[Candidate], target: TargetDesc, system_lib: bool = False):
    """One TVM runtime module holding every candidate under its own symbol."""
    funcs = {}
    for c in cands:  # scheduled one by one: candidates of one kernel share its IR nodes until scheduled
        one = tvm.IRModule({c.symbol: c.func.with_attr("global_symbol", c.symbol)})
        funcs[c.symbol] = schedule(one, {c.symbol: c.lanes})[c.symbol]
    mod = tvm.IRModule(funcs)
    if system_lib:  # registers its functions in the process's system library when the program starts
        mod = mod.with_attr("system_lib_prefix", "")
    return tvm.compile(mod, target=target.tvm()).mod


def random_args(func: tvm.tirx.PrimFunc, dev, rng: np.random.Generator) -> list:
    args = []
    for p in func.params:
        shape = [int(d) for d in p.shape]
        dtype = str(p.dtype)
        if dtype.startswith(("int", "uint")):
            info = np.iinfo(dtype)
            a = rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
        else:
            a = (rng.standard_normal(shape) * 0.05).astype(dtype)
        args.append(tvm.runtime.tensor(a, device=dev))
    return args


def _time_all(mod, cands: list[Candidate], dev, number: int, repeat: int) -> dict[str, float]:
    args = {}
    out = {}
    for c in cands:
        if c.kernel not in args:  # candidates of one kernel share its arguments
            args[c.kernel] = random_args(c.func, dev, np.random.default_rng(0))
        out[c.symbol] = min(mod.time_evaluator(c.symbol, dev, number=number, repeat=repeat)(*args[c.kernel]).results)
    return out


class Local:
    """Times candidates on this machine."""

    def __init__(self, number: int = 50, repeat: int = 3):
        self.number, self.repeat = number, repeat
        self.where = "this machine"

    def measure(self, groups: list[list[Candidate]], target: TargetDesc, progress=None) -> dict[str, float]:
        out = {}
        for group in progress(groups) if progress else groups:
            out.update(_time_all(candidate_module(group, target), group, tvm.cpu(), self.number, self.repeat))
        return out


def _split_addr(addr: str, option: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise MeasureError(f"{option} {addr!r} is not HOST:PORT (e.g. 127.0.0.1:9190)")
    return host, int(port)


class Remote:
    """Times candidates on RPC servers: one (`server`), or every board of `key` at a tracker, in
    parallel (`boards` sessions at once; default: as many as the tracker lists for the key)."""

    def __init__(self, server: str | None = None, tracker: str | None = None, key: str = "", boards: int | None = None,
                 number: int = 50, repeat: int = 3, session_timeout: float = 600):
        if (server is None) == (tracker is None):
            raise MeasureError("give one of an RPC server (--rpc HOST:PORT) or a tracker (--rpc-tracker HOST:PORT)")
        if tracker is not None and not key:
            raise MeasureError("--rpc-tracker needs --rpc-key: the key the boards registered with (rpc_server --key)")
        self.number, self.repeat, self.key, self.timeout = number, repeat, key, session_timeout
        if server is not None:
            self.addr = _split_addr(server, "--rpc")
            self.tracker = None
            self.boards = 1
            self.where = f"rpc {server}"
        else:
            self.addr = _split_addr(tracker, "--rpc-tracker")
            try:
                self.tracker = rpc.connect_tracker(*self.addr)
                listed = sum(1 for s in self.tracker.summary()["server_info"] if s["key"].split(":")[-1] == key)
            except (OSError, RuntimeError) as e:
                raise MeasureError(f"cannot reach the RPC tracker at {tracker}: {e}") from None
            if listed == 0:
                raise MeasureError(f"the tracker at {tracker} lists no board with key {key!r}: start one with "
                                   f"python -m tvm.exec.rpc_server --tracker {tracker} --key {key}")
            self.boards = min(boards or listed, listed)
            self.where = f"tracker {tracker} key {key}"
        self.sessions_used: list[int] = []  # kernels timed by each session (tests read it)

    def _session(self):
        if self.tracker is not None:
            return self.tracker.request(self.key, priority=1, session_timeout=self.timeout)
        return rpc.connect(*self.addr, key=self.key, session_timeout=self.timeout)

    def measure(self, groups: list[list[Candidate]], target: TargetDesc, progress=None) -> dict[str, float]:
        """`progress` (a progress factory) follows the builds here; the boards' timing is not shown."""
        cc = toolchain.compiler(target)
        results: dict[str, float] = {}
        errors: list[BaseException] = []
        lock = threading.Lock()
        self.sessions_used = []
        with tempfile.TemporaryDirectory(prefix="edgemoe-tune-") as tmp:
            jobs: queue.Queue = queue.Queue()
            for i, group in enumerate(progress(groups) if progress else groups):  # built here, for the target
                path = Path(tmp) / f"candidates{i}.so"
                candidate_module(group, target).export_library(str(path), fcompile=tvm.support.cc.cross_compiler(cc))
                jobs.put((path, group))

            def worker():  # one board: takes kernels until none are left
                timed = 0
                try:
                    sess = self._session()
                    dev = sess.cpu(0)
                    while True:
                        try:
                            path, group = jobs.get_nowait()
                        except queue.Empty:
                            break
                        sess.upload(str(path))
                        times = _time_all(sess.load_module(path.name), group, dev, self.number, self.repeat)
                        timed += 1
                        with lock:
                            results.update(times)
                except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
                    with lock:
                        errors.append(e)
                finally:
                    with lock:
                        self.sessions_used.append(timed)

            threads = [threading.Thread(target=worker) for _ in range(self.boards)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        if errors:
            raise MeasureError(f"timing on {self.where} failed: {errors[0]}") from errors[0]
        return results


class MinRPC:
    """Times candidates on a board without Python: TVM's minimal RPC server, built for the board's
    architecture with `tvm.rpc.with_minrpc` and linked against the board's TVM runtime
    (libtvm_runtime.so and libtvm_ffi.so in `runtime_dir`, e.g. from the apache-tvm wheel for that
    architecture), with every candidate in its system library; started by `launcher` (a command
    prefix: qemu-user, or ssh to the board) as a popen session."""

    def __init__(self, runtime_dir: Path, launcher: list[str], cxx: str, number: int = 10, repeat: int = 2):
        self.runtime_dir = Path(runtime_dir)
        for lib in ("libtvm_runtime.so", "libtvm_ffi.so"):
            if not (self.runtime_dir / lib).is_file():
                raise MeasureError(f"{self.runtime_dir / lib} missing: the board's TVM runtime libraries are needed to "
                                   "link the minimal RPC server (scripts/setup-dev.sh unpacks aarch64 ones into "
                                   "build/tvm-runtime-aarch64)")
        self.launcher, self.cxx = launcher, cxx
        self.number, self.repeat = number, repeat
        self.where = f"minrpc via {' '.join(launcher) or 'popen'}"

    def _compile(self, output, objects, options=None):
        """with_minrpc's link, for the board: its runtime libraries replace this machine's, and the
        board's directory replaces this machine's in the run path."""
        host_libs = {os.path.basename(f): f for f in objects if f.endswith(".so")}
        objects = [str(self.runtime_dir / os.path.basename(f)) if f in host_libs.values() else f for f in objects]
        options = [o for o in options or [] if not o.startswith("-Wl,-rpath=")]
        options += [f"-Wl,-rpath={self.runtime_dir}"]
        cmd = [self.cxx, "-O2", "-o", output, *objects, *options, "-lpthread", "-ldl"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise MeasureError(f"linking the minimal RPC server failed: {shlex.join(cmd)}\n{proc.stderr[-4000:]}")

    def measure(self, groups: list[list[Candidate]], target: TargetDesc, progress=None) -> dict[str, float]:
        """One server program holds every candidate: one build, one session (`progress` has no steps to show)."""
        cands = [c for g in groups for c in g]
        with tempfile.TemporaryDirectory(prefix="edgemoe-minrpc-") as tmp:
            server = Path(tmp) / "minrpc_server"
            fcompile = rpc.with_minrpc(self._compile)
            candidate_module(cands, target, system_lib=True).export_library(str(server), fcompile=fcompile)
            launch = Path(tmp) / "launch.sh"
            launch.write_text(f"#!/bin/sh\nexec {shlex.join(self.launcher)} {shlex.quote(str(server))} \"$@\"\n")
            launch.chmod(0o755)
            sess = rpc.PopenSession(str(launch))
            return _time_all(sess.system_lib(), cands, sess.cpu(0), self.number, self.repeat)
