"""Where tuning candidates are timed. Candidates are always built here, by TVM for the target; what
differs is the machine that runs them:

* `Local`: this machine (the target must be its architecture);
* `Remote`: boards behind `tvm.rpc`: one RPC server (`--rpc HOST:PORT`), or every board a tracker
  lists under a key (`--rpc-tracker HOST:PORT --rpc-key KEY`), each board timing other kernels in
  parallel. Each kernel's candidates are one shared library (linked with the target's compiler),
  uploaded and loaded by the board's server;
* `MinRPC`: a board without Python: a minimal program serving TVM's RPC protocol over a pipe
  (popen_rpc_server.cc, on the board's libtvm_runtime) linked with all candidates as its system
  library, for the board's architecture, started through a launcher (qemu-user here; on a board,
  e.g. ssh) as a `tvm.rpc.PopenSession`.

Every measurer returns seconds per call for each candidate (best of `repeat` runs of `number`
calls, on random arguments) and a description of where they were measured, kept in the records.
"""
from __future__ import annotations

import queue
import shlex
import subprocess
import tempfile
import threading
import time
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
    func: tvm.tirx.PrimFunc  # the kernel to time: with its knobs (integer-dot), or to schedule with `lanes`
    schedule: dict  # knob → value (tuning.py): {"lanes": n} for a float kernel, int_dot.Knobs' fields for the others

    @property
    def symbol(self) -> str:
        return f"{self.kernel}__" + "_".join(f"{k}{int(v)}" for k, v in self.schedule.items())


def candidate_module(cands: list[Candidate], target: TargetDesc, system_lib: bool = False):
    """One TVM runtime module holding every candidate under its own symbol."""
    funcs = {}
    for c in cands:  # scheduled one by one: candidates of one kernel share its IR nodes until scheduled
        one = tvm.IRModule({c.symbol: c.func.with_attr("global_symbol", c.symbol)})
        funcs[c.symbol] = (schedule(one, {c.symbol: c.schedule["lanes"]}) if "lanes" in c.schedule else one)[c.symbol]
    mod = tvm.IRModule(funcs)
    if system_lib:  # registers its functions in the process's system library when the program starts
        mod = mod.with_attr("system_lib_prefix", "")
    return tvm.compile(mod, target=target.tvm()).mod


def _random_args(func: tvm.tirx.PrimFunc, dev, rng: np.random.Generator) -> list:
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
            args[c.kernel] = _random_args(c.func, dev, np.random.default_rng(0))
        out[c.symbol] = min(mod.time_evaluator(c.symbol, dev, number=number, repeat=repeat)(*args[c.kernel]).results)
    return out


def _time_cold(mod, cands: list[Candidate], dev, number: int, repeat: int, cold_bytes: int) -> dict[str, float]:
    """As _time_all, but each call meets its arguments outside the caches, as a decode step meets
    weights that the rest of the model pushed out of the last-level cache since the last token:
    the calls run back to back (the compute threads stay awake) over copies of the arguments
    that together span `cold_bytes`, one copy per call in turn."""
    copies: dict[str, list] = {}
    out = {}
    for c in cands:
        if c.kernel not in copies:
            one = sum(int(np.prod([int(d) for d in p.shape])) * tvm.DataType(str(p.dtype)).bits // 8
                      for p in c.func.params)
            n = min(max(-(-cold_bytes // max(one, 1)), 2), 256)
            copies[c.kernel] = [_random_args(c.func, dev, np.random.default_rng(i)) for i in range(n)]
        f, args = mod[c.symbol], copies[c.kernel]
        for a in args:  # warm-up: code, page tables, the compute threads
            f(*a)
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            for i in range(number):
                f(*args[i % len(args)])
            best = min(best, (time.perf_counter() - t0) / number)
        out[c.symbol] = best
    return out


def last_level_cache_bytes() -> int:
    """This machine's largest CPU cache (Linux sysfs), or 32 MiB where it says nothing."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip("KMG")) * scale)
        except ValueError:
            pass
    return max(sizes, default=32 << 20)


def local_measurer(weight_bytes: int, number: int = 50, caches: str = "auto") -> "Local":
    """This machine's measurer for a model of `weight_bytes` resident weights: caches "cold" or
    "warm", or "auto": cold where the weights exceed the last-level cache (then each token streams
    them from memory), the copies spanning twice that cache."""
    if caches not in ("auto", "cold", "warm"):
        raise MeasureError(f"caches {caches!r} is not auto, cold or warm")
    llc = last_level_cache_bytes()
    cold = caches == "cold" or (caches == "auto" and weight_bytes > llc)
    return Local(number, cold_bytes=2 * llc if cold else 0)


class Local:
    """Times candidates on this machine; with `cold_bytes`, with their arguments out of the caches
    (_time_cold): for a model whose weights exceed the last-level cache, where decode streams
    every weight from memory and a kernel timed in a warm cache ranks schedules wrongly."""

    def __init__(self, number: int = 50, repeat: int = 3, cold_bytes: int = 0):
        self.number, self.repeat, self.cold_bytes = number, repeat, cold_bytes
        self.where = "this machine" + (", caches cold" if cold_bytes else "")

    def measure(self, groups: list[list[Candidate]], target: TargetDesc, progress=None) -> dict[str, float]:
        out = {}
        for group in progress(groups) if progress else groups:
            mod = candidate_module(group, target)
            out.update(_time_cold(mod, group, tvm.cpu(), self.number, self.repeat, self.cold_bytes) if self.cold_bytes
                       else _time_all(mod, group, tvm.cpu(), self.number, self.repeat))
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
        self.tracker = tracker
        if server is not None:
            self.addr = _split_addr(server, "--rpc")
            self.boards = 1
            self.where = f"rpc {server}"
        else:
            self.addr = _split_addr(tracker, "--rpc-tracker")
            try:
                summary = rpc.connect_tracker(*self.addr).summary()
                listed = sum(1 for s in summary["server_info"] if s["key"].split(":")[-1] == key)
            except (OSError, RuntimeError) as e:
                raise MeasureError(f"cannot reach the RPC tracker at {tracker}: {e}") from None
            if listed == 0:
                raise MeasureError(f"the tracker at {tracker} lists no board with key {key!r}: start one with "
                                   f"python -m tvm.exec.rpc_server --tracker {tracker} --key {key}")
            self.boards = min(boards or listed, listed)
            self.where = f"tracker {tracker} key {key}"
        self.sessions_used: list[int] = []  # kernels timed by each session (tests read it)

    def _session(self):
        if self.tracker is not None:  # a tracker connection per board: one is not safe to share between threads
            return rpc.connect_tracker(*self.addr).request(self.key, priority=1, session_timeout=self.timeout)
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

            start = threading.Barrier(self.boards)

            def worker():  # one board: takes kernels until none are left
                timed = 0
                try:
                    sess = self._session()
                    dev = sess.cpu(0)
                    start.wait()  # every board holds its session before the first kernel is taken
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
                    start.abort()  # the other boards stop waiting (after this error is first in the list)
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


SERVER_SOURCE = Path(__file__).with_name("popen_rpc_server.cc")


class MinRPC:
    """Times candidates on a board without Python: a TVM RPC server program (popen_rpc_server.cc)
    built here for the board's architecture with `cxx`, linked against the board's TVM runtime
    (libtvm_runtime.so and libtvm_ffi.so in `runtime_dir`, e.g. from the apache-tvm wheel for that
    architecture) with every candidate in its system library, and started by `launcher` (a command
    prefix: qemu-user here; on a board, e.g. a script running it over ssh) as a popen session."""

    def __init__(self, runtime_dir: Path, launcher: list[str], cxx: str, number: int = 10, repeat: int = 2):
        self.runtime_dir = Path(runtime_dir).resolve()
        for lib in ("libtvm_runtime.so", "libtvm_ffi.so"):
            if not (self.runtime_dir / lib).is_file():
                raise MeasureError(f"{self.runtime_dir / lib} missing: the board's TVM runtime libraries are needed to "
                                   "link its RPC server (scripts/setup-dev.sh unpacks aarch64 ones into "
                                   "build/tvm-runtime-aarch64)")
        self.launcher, self.cxx = launcher, cxx
        self.number, self.repeat = number, repeat
        self.where = f"popen RPC server via {' '.join(launcher) or 'this machine'}"

    def _link(self, output, objects, options=None):
        """export_library's compile step: the server program, the kernels' objects, the board's runtime."""
        import tvm_ffi
        from tvm import libinfo

        includes = {libinfo.find_include_path(), tvm_ffi.libinfo.find_include_path(),
                    tvm_ffi.libinfo.find_dlpack_include_path()}
        # --no-as-needed: nothing names libtvm_runtime's symbols, but its static initialisers register
        # rpc.CreateEventDrivenServer and the system library
        cmd = [self.cxx, "-std=c++17", "-O2", "-o", output, str(SERVER_SOURCE), *objects, *(options or []),
               *(f"-I{d}" for d in sorted(includes)), f"-L{self.runtime_dir}", "-Wl,--no-as-needed",
               "-ltvm_runtime", "-ltvm_ffi", f"-Wl,-rpath={self.runtime_dir}", "-lpthread", "-ldl"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise MeasureError(f"linking the board's RPC server failed: {shlex.join(cmd)}\n{proc.stderr[-4000:]}")

    def measure(self, groups: list[list[Candidate]], target: TargetDesc, progress=None) -> dict[str, float]:
        """One server program holds every candidate: one build, one session (`progress` has no steps to show)."""
        cands = [c for g in groups for c in g]
        with tempfile.TemporaryDirectory(prefix="edgemoe-popen-rpc-") as tmp:
            server = Path(tmp) / "rpc_server"
            candidate_module(cands, target, system_lib=True).export_library(str(server), fcompile=self._link)
            launch = Path(tmp) / "launch.sh"
            launch.write_text(f"#!/bin/sh\nexec {shlex.join(self.launcher)} {shlex.quote(str(server))} \"$@\"\n")
            launch.chmod(0o755)
            sess = rpc.PopenSession(str(launch))
            return _time_all(sess.system_lib(), cands, sess.cpu(0), self.number, self.repeat)
