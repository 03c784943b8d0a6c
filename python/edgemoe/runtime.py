"""ctypes bindings to the C runtime (libedgemoe.so), built from runtime_c/ with CMake on first use."""
from __future__ import annotations

import ctypes
import os
import subprocess
import threading
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BUILD_DIR = REPO_ROOT / "build" / "runtime"
# an installed package (a wheel, pip install .) carries the runtime here, built with the package (setup.py)
PACKAGED_DIR = Path(__file__).resolve().parent / "_native"


def runtime_dir() -> Path:
    """Where libedgemoe.so and edgemoe_run are: the package's own copy when installed, else the
    source checkout's build (built by build_runtime)."""
    return PACKAGED_DIR if (PACKAGED_DIR / "libedgemoe.so").is_file() else DEFAULT_BUILD_DIR

STATUS_NAMES = {-1: "io", -2: "format", -3: "budget", -4: "argument", -5: "kernel", -6: "nomem"}


class EdgeMoEError(RuntimeError):
    """A failure reported by the C runtime; `kind` is io, format, budget, argument, kernel or nomem."""

    def __init__(self, code: int, message: str):
        self.code = code
        self.kind = STATUS_NAMES.get(code, "unknown")
        super().__init__(message)


# "auto" (the default): fitted-router and EdgeMoE eviction where the artifact has a routing
# profile, else next-router and LRU; Session.info says what was chosen.
PREDICTORS = {"none": 0, "path-table": 1, "next-router": 2, "wrong": 3, "fitted-router": 4, "auto": 5}
EVICTIONS = {"lru": 0, "fifo": 1, "edgemoe": 2, "auto": 3}
STORAGES = {"pread": 0, "mmap": 1}


class _Params(ctypes.Structure):
    _fields_ = [("artifact_dir", ctypes.c_char_p), ("memory_budget", ctypes.c_uint64),
                ("max_seq", ctypes.c_uint32), ("verify_checksums", ctypes.c_int), ("storage", ctypes.c_int),
                ("direct_io", ctypes.c_int), ("emulate_bandwidth", ctypes.c_double),
                ("emulate_latency", ctypes.c_double), ("loader_thread", ctypes.c_int), ("predictor", ctypes.c_int),
                ("prefetch_experts", ctypes.c_uint32), ("eviction", ctypes.c_int), ("compute_threads", ctypes.c_uint32),
                ("inject_faults", ctypes.c_char_p), ("readers", ctypes.c_uint32),
                ("emulate_memory_bandwidth", ctypes.c_double), ("emulate_int8_ops", ctypes.c_double),
                ("emulate_fp32_flops", ctypes.c_double), ("prefetch_margin", ctypes.c_float),
                ("one_read_per_record", ctypes.c_int), ("prefetch_layers", ctypes.c_uint32),
                ("preload", ctypes.c_int), ("prefill_tokens", ctypes.c_uint32), ("single_token_kernels", ctypes.c_int)]


_STAT_FIELDS = ["tokens", "expert_hits", "expert_misses", "bytes_read", "read_ns", "compute_ns", "memory_bytes",
                "trunk_bytes", "expert_cache_bytes", "stall_ns", "prefetch_issued", "prefetch_used",
                "prefetch_wasted", "predicted", "predicted_hits"]


class _Stats(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in _STAT_FIELDS] + [("cache_slots", ctypes.c_uint32),
                                                               ("record_bytes", ctypes.c_uint32),
                                                               ("read_retries", ctypes.c_uint64),
                                                               ("records_read", ctypes.c_uint64),
                                                               ("board_wait_ns", ctypes.c_uint64),
                                                               ("predictions", ctypes.c_uint64),
                                                               ("prefetch_named", ctypes.c_uint64),
                                                               ("read_requests", ctypes.c_uint64),
                                                               ("preloaded", ctypes.c_uint64),
                                                               ("predicted_ahead", ctypes.c_uint64),
                                                               ("predicted_ahead_hits", ctypes.c_uint64),
                                                               ("prefetch_declined", ctypes.c_uint64),
                                                               ("batched_calls", ctypes.c_uint64),
                                                               ("kv_cache_bytes", ctypes.c_uint64)]


class _Sampling(ctypes.Structure):
    _fields_ = [("temperature", ctypes.c_float), ("top_k", ctypes.c_uint32), ("top_p", ctypes.c_float),
                ("repetition_penalty", ctypes.c_float), ("seed", ctypes.c_uint64)]


class _Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint32) for n in ("vocab_size", "hidden_size", "num_layers", "num_experts", "top_k",
                                               "max_seq")] + [("bos_token_id", ctypes.c_int32),
                                                              ("eos_token_id", ctypes.c_int32),
                                                              ("predictor", ctypes.c_int), ("eviction", ctypes.c_int),
                                                              ("num_expert_layers", ctypes.c_uint32),
                                                              ("expert_lanes", ctypes.c_uint32),
                                                              ("kv_cache_bits", ctypes.c_uint32)]


def build_runtime(build_dir: Path = DEFAULT_BUILD_DIR, target=None, sanitize: str | None = None) -> Path:
    """Configure and build runtime_c with CMake; returns the path of libedgemoe.so. With a
    TargetDesc whose triple is not this machine's, cross-compile with the target's C compiler;
    with `sanitize` ("address,undefined", "thread"), an instrumented debug build."""
    build_dir = Path(build_dir)
    configure = ["cmake", "-S", str(REPO_ROOT), "-B", str(build_dir),
                 f"-DCMAKE_BUILD_TYPE={'Debug' if sanitize else 'Release'}", f"-DEM_SANITIZE={sanitize or ''}"]
    if target is not None:
        from .targets import toolchain

        configure += toolchain.cmake_cross_args(target)
    for cmd in (configure, ["cmake", "--build", str(build_dir), "-j", str(os.cpu_count() or 1)]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"building the C runtime failed: {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    return build_dir / "libedgemoe.so"


_lib = None
_lib_lock = threading.Lock()


def library() -> ctypes.CDLL:
    """The loaded runtime: $EDGEMOE_RUNTIME_LIB, else the installed package's, else the source
    checkout's build/runtime/libedgemoe.so (built if missing)."""
    global _lib
    with _lib_lock:
        if _lib is None:
            path = os.environ.get("EDGEMOE_RUNTIME_LIB")
            path = Path(path) if path else runtime_dir() / "libedgemoe.so"
            if not path.is_file():
                if not (REPO_ROOT / "CMakeLists.txt").is_file():
                    raise RuntimeError(f"the C runtime is missing ({path}): this installation was built without "
                                       "it; reinstall EdgeMoE (pip install .) where cmake and a C compiler exist")
                path = build_runtime()
            # RTLD_GLOBAL: the artifact's kernels.so resolves the runtime's TVM shim symbols against it.
            lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
            lib.em_open.argtypes = [ctypes.POINTER(_Params), ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p,
                                    ctypes.c_size_t]
            lib.em_budget_bytes.argtypes = [ctypes.c_char_p, ctypes.c_uint32, ctypes.c_double,
                                            ctypes.POINTER(ctypes.c_uint64), ctypes.c_char_p, ctypes.c_size_t]
            lib.em_close.argtypes = [ctypes.c_void_p]
            lib.em_reset.argtypes = [ctypes.c_void_p]
            lib.em_prefill.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int32), ctypes.c_size_t]
            lib.em_decode_step.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.POINTER(ctypes.c_float)]
            lib.em_logits.argtypes = [ctypes.c_void_p]
            lib.em_logits.restype = ctypes.POINTER(ctypes.c_float)
            lib.em_stats_get.argtypes = [ctypes.c_void_p, ctypes.POINTER(_Stats)]
            lib.em_model_info_get.argtypes = [ctypes.c_void_p, ctypes.POINTER(_Info)]
            lib.em_route_trace.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32), ctypes.c_uint32]
            lib.em_route_trace_tokens.argtypes = [ctypes.c_void_p]
            lib.em_route_trace_tokens.restype = ctypes.c_uint32
            lib.em_error.argtypes = [ctypes.c_void_p]
            lib.em_error.restype = ctypes.c_char_p
            lib.em_sampler_create.argtypes = [ctypes.POINTER(_Sampling), ctypes.c_uint32,
                                              ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p, ctypes.c_size_t]
            lib.em_sample.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_int32),
                                      ctypes.c_size_t]
            lib.em_sample.restype = ctypes.c_int32
            lib.em_sampler_free.argtypes = [ctypes.c_void_p]
            _lib = lib
        return _lib


def budget_bytes(artifact_dir: str | Path, max_seq: int = 0, expert_fraction: float = 0.0) -> int:
    """The memory budget (bytes) whose expert cache holds this fraction of the expert bytes at this
    context length (0 = the artifact's maximum); expert_fraction=0 gives the minimum the artifact
    can run with (one layer's top-k experts)."""
    lib, out, err = library(), ctypes.c_uint64(), ctypes.create_string_buffer(1024)
    rc = lib.em_budget_bytes(str(artifact_dir).encode(), max_seq, expert_fraction, ctypes.byref(out), err, len(err))
    if rc:
        raise EdgeMoEError(rc, err.value.decode())
    return out.value


def _choice(table: dict, value: str, what: str) -> int:
    if value not in table:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(table)}")
    return table[value]


class Session:
    """An open artifact in the C runtime. Use as a context manager or call close().

    memory_budget: bytes for everything the runtime allocates (0 = every expert resident).
    storage: "pread" (direct_io: O_DIRECT) or "mmap"; emulate=(bandwidth B/s, latency s) stretches
    each expert read to that device's speed. loader_thread reads experts on a second thread, which
    prefetching needs; predictor: auto, none, path-table, next-router, fitted-router or wrong (a test
    of robustness); eviction: auto, lru, fifo or edgemoe. info["predictor"] and info["eviction"]
    name the ones in use. readers: expert reads in flight at once (reader threads). inject_faults (testing) makes chosen expert reads fail, e.g. "eio@3,corrupt@7"
    (runtime_c/src/storage.h). emulate_compute=(memory bandwidth B/s, int8 ops/s, fp32 FLOP/s)
    makes every kernel last as long as on that board (a target's "compute"; runtime_c/src/pacer.h).
    prefetch_margin > 0: a confidence-driven number of experts to prefetch per layer, the predicted
    top-k and those within that many logits of the k-th, at most prefetch_experts (0: 2 · top-k).
    coalesce: records queued together that lie side by side in experts.bin are read in one request
    (False: one request per record; stats()["read_requests"] counts them). prefetch_layers (1..4): layers
    with experts a hidden-state predictor prefetches ahead (2: also the layer after the next, from the
    same state, so a read has two layers' compute to arrive in). preload: fill the expert cache at open
    with the most often chosen experts (stats()["preloaded"] of them), so the first tokens do not
    miss on each first use. prefill_tokens: a prompt's tokens prefill runs through each layer together
    (0: the runtime's default; 1: token by token, as decode_step feeds them, predicting between layers,
    which a study of decode-time prefetching over a text wants); the logits are the same either way.
    batched_kernels=False: within a batch, one token per expert kernel call (a comparison with the
    batched expert kernels, which take several; same logits).
    """

    def __init__(self, artifact_dir: str | Path, memory_budget: int = 0, max_seq: int = 0, verify: bool = True,
                 storage: str = "pread", direct_io: bool = False, emulate: tuple[float, float] | None = None,
                 loader_thread: bool = True, predictor: str = "auto", prefetch_experts: int = 0,
                 eviction: str = "auto", threads: int = 1, inject_faults: str | None = None, readers: int = 1,
                 emulate_compute: tuple[float, float, float] | None = None, prefetch_margin: float = 0.0,
                 coalesce: bool = True, prefetch_layers: int = 1, preload: bool = False, prefill_tokens: int = 0,
                 batched_kernels: bool = True):
        self._h = None
        self._trace = np.zeros((0, 0, 0), np.uint32)
        self._lib = library()
        bandwidth, latency = emulate or (0.0, 0.0)
        params = _Params(str(artifact_dir).encode(), memory_budget, max_seq, int(verify),
                         _choice(STORAGES, storage, "storage"), int(direct_io), bandwidth, latency, int(loader_thread),
                         _choice(PREDICTORS, predictor, "predictor"), prefetch_experts,
                         _choice(EVICTIONS, eviction, "eviction policy"), threads,
                         inject_faults.encode() if inject_faults else None, readers,
                         *(emulate_compute or (0.0, 0.0, 0.0)), prefetch_margin, int(not coalesce),
                         prefetch_layers, int(preload), prefill_tokens, int(not batched_kernels))
        handle, err = ctypes.c_void_p(), ctypes.create_string_buffer(1024)
        rc = self._lib.em_open(ctypes.byref(params), ctypes.byref(handle), err, len(err))
        if rc:
            raise EdgeMoEError(rc, err.value.decode())
        self._h = handle
        info = _Info()
        self._lib.em_model_info_get(self._h, ctypes.byref(info))
        self.info = {n: getattr(info, n) for n, _ in _Info._fields_}
        self.info["predictor"] = {v: k for k, v in PREDICTORS.items()}[info.predictor]
        self.info["eviction"] = {v: k for k, v in EVICTIONS.items()}[info.eviction]

    def _check(self, rc: int) -> None:
        if rc:
            raise EdgeMoEError(rc, self._lib.em_error(self._h).decode())

    def _logits(self) -> np.ndarray:
        return np.ctypeslib.as_array(self._lib.em_logits(self._h), (self.info["vocab_size"],)).copy()

    def prefill(self, tokens: list[int]) -> np.ndarray:
        """Feed the tokens; returns the logits after the last one."""
        arr = (ctypes.c_int32 * len(tokens))(*tokens)
        self._check(self._lib.em_prefill(self._h, arr, len(tokens)))
        return self._logits()

    def decode_step(self, token: int) -> np.ndarray:
        self._check(self._lib.em_decode_step(self._h, token, None))
        return self._logits()

    def generate(self, prompt: list[int], n_new: int, stop_token: int | None = None) -> list[int]:
        """Greedy generation of up to n_new tokens after the prompt."""
        logits, out = self.prefill(prompt), []
        for _ in range(n_new):
            nxt = int(np.argmax(logits))
            out.append(nxt)
            if nxt == stop_token:
                break
            logits = self.decode_step(nxt)
        return out

    def reset(self) -> None:
        self._lib.em_reset(self._h)

    def trace_routing(self, max_tokens: int) -> None:
        """Record the experts every MoE layer selects for the next max_tokens tokens (routing_trace reads them)."""
        self._trace = np.zeros((max_tokens, self.info["num_expert_layers"], self.info["top_k"]), np.uint32)
        self._lib.em_route_trace(self._h, self._trace.ctypes.data_as(ctypes.POINTER(ctypes.c_uint32)), max_tokens)

    def routing_trace(self) -> np.ndarray:
        """[tokens, expert layers, top_k] expert ids recorded since trace_routing."""
        return self._trace[: self._lib.em_route_trace_tokens(self._h)].copy()

    def stats(self) -> dict:
        st = _Stats()
        self._lib.em_stats_get(self._h, ctypes.byref(st))
        return {n: getattr(st, n) for n, _ in _Stats._fields_}

    def close(self) -> None:
        if self._h:
            self._lib.em_close(self._h)
            self._h = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()


class Sampler:
    """The C runtime's sampler (runtime_c/src/sampler.c): repetition penalty, temperature, top-k,
    top-p and a seeded draw; temperature 0 is greedy. The same seed gives the same tokens here and
    in edgemoe_run."""

    def __init__(self, vocab_size: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 repetition_penalty: float = 1.0, seed: int = 0):
        self._lib, self._h = library(), None
        params = _Sampling(temperature, top_k, top_p, repetition_penalty, seed)
        handle, err = ctypes.c_void_p(), ctypes.create_string_buffer(512)
        rc = self._lib.em_sampler_create(ctypes.byref(params), vocab_size, ctypes.byref(handle), err, len(err))
        if rc:
            raise EdgeMoEError(rc, err.value.decode())
        self._h, self.vocab_size = handle, vocab_size

    def sample(self, logits: np.ndarray, history: list[int]) -> int:
        logits = np.ascontiguousarray(logits, dtype=np.float32)
        if logits.shape != (self.vocab_size,):
            raise ValueError(f"logits of shape {logits.shape}, expected ({self.vocab_size},)")
        hist = (ctypes.c_int32 * len(history))(*history)
        return int(self._lib.em_sample(self._h, logits.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), hist,
                                       len(history)))

    def close(self) -> None:
        if self._h:
            self._lib.em_sampler_free(self._h)
            self._h = None

    def __del__(self):
        self.close()
