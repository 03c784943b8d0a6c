"""Running a command under a RAM cap the kernel enforces: a memory cgroup made for the run.

The cap covers everything the process charges to memory, page cache included, so a program that maps
a model larger than the cap (llama.cpp's mmap) has its pages evicted and re-read as it goes, and the
bytes it reads from storage are real. cgroup v2 (memory.max, memory.peak) where the unified
hierarchy has the memory controller, else v1 (memory.limit_in_bytes, memory.max_usage_in_bytes).
Making a cgroup needs root or a delegated subtree; without one the error says so.
"""
from __future__ import annotations

import os
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

V2_ROOT = Path("/sys/fs/cgroup")
V1_ROOT = Path("/sys/fs/cgroup/memory")


class MemCapError(RuntimeError):
    pass


@dataclass
class CappedRun:
    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    peak_bytes: int  # the cgroup's peak charge: resident memory and page cache
    max_rss_bytes: int  # the largest resident set of any one process of the run (as /usr/bin/time -v)
    read_bytes: int  # bytes the run read from storage (block input, counted by the kernel)
    page_cache_bytes: int  # page cache charged to the cgroup when the run ended
    peak_anon_bytes: int  # the largest resident memory of all its processes together (sampled every 0.2 s)
    timed_out: bool = False  # killed at the timeout


def _layout() -> tuple[str, Path]:
    controllers = V2_ROOT / "cgroup.controllers"
    if controllers.is_file() and "memory" in controllers.read_text().split():
        return "v2", V2_ROOT
    if (V1_ROOT / "memory.limit_in_bytes").is_file():
        return "v1", V1_ROOT
    raise MemCapError("no memory cgroup controller is mounted (/sys/fs/cgroup): a RAM cap cannot be enforced here")


def drop_page_cache(files: list[Path]) -> None:
    """Evicts `files` from the page cache, so the next reads come from storage: the kernel's
    drop_caches where allowed (root), else per-file POSIX_FADV_DONTNEED (clean pages only)."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return
    except OSError:
        pass
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_capped(cmd: list[str], cap_bytes: int, timeout: float | None = None, env: dict | None = None) -> CappedRun:
    """Runs `cmd` in a fresh memory cgroup capped at `cap_bytes` (no swap) and reports what it used;
    past `timeout` seconds it is killed (timed_out). The cgroup is removed afterwards."""
    version, root = _layout()
    group = root / f"edgemoe-bench-{uuid.uuid4().hex[:12]}"
    try:
        group.mkdir()
    except OSError as e:
        raise MemCapError(f"cannot make a memory cgroup under {root} ({e.strerror}): run as root, or inside a "
                          f"delegated cgroup (e.g. systemd-run --user --scope -p Delegate=yes …)") from e
    try:
        if version == "v2":
            (group / "memory.max").write_text(str(cap_bytes))
            if (group / "memory.swap.max").exists():
                (group / "memory.swap.max").write_text("0")
        else:
            (group / "memory.limit_in_bytes").write_text(str(cap_bytes))
            swap = group / "memory.memsw.limit_in_bytes"
            if swap.exists():
                swap.write_text(str(cap_bytes))
        procs = group / "cgroup.procs"

        def enter():  # in the child, before exec: everything it runs is charged to the group
            procs.write_text(str(os.getpid()))

        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env, preexec_fn=enter)
            timer = threading.Timer(timeout, proc.kill) if timeout else None
            if timer:
                timer.start()
            anon = _AnonSampler(version, group)
            # wait4, not Popen.wait: the rusage of this child and of the processes it waited for
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - t0
            anon.stop()
            proc.returncode = os.waitstatus_to_exitcode(status)
            if timer:
                timer.cancel()
            out.seek(0), err.seek(0)
            stdout, stderr = out.read(), err.read()
        peak, cache = _peak_and_cache(version, group)
        return CappedRun(proc.returncode, stdout, stderr, wall, peak, usage.ru_maxrss * 1024,
                         usage.ru_inblock * 512, cache, anon.peak,
                         timed_out=bool(timeout) and proc.returncode == -9 and wall >= timeout)
    finally:
        for _ in range(50):  # the group empties once the kernel has reaped its last task
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)


class _AnonSampler(threading.Thread):
    """Polls the cgroup's anonymous (resident, not page cache) memory and keeps its maximum: the
    kernel keeps a peak of the whole charge only, which a file-reading run fills with page cache."""

    def __init__(self, version: str, group: Path):
        super().__init__(daemon=True)
        self.path, self.key = group / "memory.stat", "anon" if version == "v2" else "total_rss"
        self.peak, self.done = 0, threading.Event()
        self.start()

    def run(self):
        while not self.done.wait(0.2):
            self.sample()

    def sample(self):
        try:
            for line in self.path.read_text().splitlines():
                key, value = line.split()
                if key == self.key:
                    self.peak = max(self.peak, int(value))
        except OSError:
            pass

    def stop(self):
        self.sample()
        self.done.set()
        self.join()


def _peak_and_cache(version: str, group: Path) -> tuple[int, int]:
    if version == "v2":
        peak = int((group / "memory.peak").read_text()) if (group / "memory.peak").exists() else 0
        stat = dict(line.split() for line in (group / "memory.stat").read_text().splitlines())
        return peak, int(stat.get("file", 0))
    stat = dict(line.split() for line in (group / "memory.stat").read_text().splitlines())
    return int((group / "memory.max_usage_in_bytes").read_text()), int(stat.get("cache", 0))
