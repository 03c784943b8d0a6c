"""Command-line entry points: edgemoe-compile and edgemoe-run."""
from __future__ import annotations

import json
import math
import re
import resource
import sys
import time
from pathlib import Path

import click

from .units import fmt_bytes, parse_bytes

# Limits of the C runtime's parameters (runtime_c/include/edgemoe.h): a larger number would wrap.
UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1
INT32_MAX = 2**31 - 1  # token ids are int32
MAX_THREADS = 1024
MAX_EMULATE_MBPS, MAX_EMULATE_MS = 1e6, 6e4  # emulated storage: up to 1 TB/s, up to a minute per read


class _Bytes(click.ParamType):
    """A byte size as units.parse_bytes reads it ("24MiB", "1.5GB", "12000000"), within [lo, hi]."""
    name = "SIZE"

    def __init__(self, lo: int = 1, hi: int = UINT64_MAX):
        self.lo, self.hi = lo, hi

    def convert(self, value, param, ctx):
        try:
            n = value if isinstance(value, int) and not isinstance(value, bool) else parse_bytes(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)
        if n < self.lo:
            self.fail(f"{value!r} is {n} bytes; give at least {self.lo} byte{'s' if self.lo != 1 else ''}", param, ctx)
        if n > self.hi:
            self.fail(f"{value!r} is out of range; give at most {self.hi} bytes", param, ctx)
        return n


def _describe(lo, hi, lo_open=False, hi_open=False) -> str:
    parts = ([f"x{'>' if lo_open else '>='}{lo}"] if lo is not None else []) + \
        ([f"x{'<' if hi_open else '<='}{hi}"] if hi is not None else [])
    return " and ".join(parts) if parts else "any finite number"


class _Finite(click.FloatRange):
    """click.FloatRange that also refuses nan and ±inf (which the range comparisons let through)."""

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number; give "
                      f"{_describe(self.min, self.max, self.min_open, self.max_open)}", param, ctx)
        return rv


def _check_number(text: str, kind, lo=None, hi=None, lo_open=False, hi_open=False, what="value"):
    """One number of a list option: parsed as `kind` (int or float), finite and within range;
    ValueError with a message otherwise."""
    t = text.strip()
    try:
        if kind is int:
            if not re.fullmatch(r"[+-]?[0-9]+", t):
                raise ValueError
            v = int(t)
        else:
            v = float(t)
    except ValueError:
        raise ValueError(f"{what} {text!r} is not {'a whole number' if kind is int else 'a number'}; give "
                         f"{_describe(lo, hi, lo_open, hi_open)}") from None
    bad = not math.isfinite(v) or (lo is not None and (v <= lo if lo_open else v < lo)) or \
        (hi is not None and (v >= hi if hi_open else v > hi))
    if bad:
        raise ValueError(f"{what} {text!r} is out of range; give {_describe(lo, hi, lo_open, hi_open)}")
    return v


class _NumberList(click.ParamType):
    """Comma-separated numbers, each checked as _check_number; optionally one of `choices`."""
    name = "N,N,..."

    def __init__(self, kind=int, lo=None, hi=None, lo_open=False, hi_open=False, choices=None, allow_empty=False):
        self.kind, self.lo, self.hi, self.lo_open, self.hi_open = kind, lo, hi, lo_open, hi_open
        self.choices, self.allow_empty = choices, allow_empty

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        if self.allow_empty and not str(value).strip():
            return []
        out = []
        for i, item in enumerate(str(value).split(","), 1):
            try:
                v = _check_number(item, self.kind, self.lo, self.hi, self.lo_open, self.hi_open, f"element {i}")
            except ValueError as e:
                self.fail(str(e), param, ctx)
            if self.choices is not None and v not in self.choices:
                self.fail(f"element {i} {item!r} is not one of {', '.join(map(str, self.choices))}", param, ctx)
            out.append(v)
        return out


class _Percent(click.ParamType):
    """'1%' or '1' -> 0.01: tolerances are always given in percent, within (0%, 100%)."""
    name = "P%"

    def convert(self, value, param, ctx):
        if isinstance(value, float):
            return value
        try:
            pct = float(str(value).strip().rstrip("%"))
        except ValueError:
            self.fail(f"{value!r} is not a percentage; write e.g. --tolerance 1%", param, ctx)
        if not 0 < pct < 100:  # also refuses nan
            self.fail(f"{value!r} is outside (0%, 100%); write e.g. --tolerance 1%", param, ctx)
        return pct / 100.0


def _token_ids(text: str, option: str = "--tokens") -> list[int]:
    """Comma-separated token ids, each a whole number in [0, 2^31 - 1] (the runtime's int32; whether
    the vocabulary holds it is the runtime's check). click.BadParameter names the bad element."""
    ids = []
    for i, item in enumerate(text.split(","), 1):
        t = item.strip()
        if not re.fullmatch(r"[0-9]+", t) or int(t) > INT32_MAX:
            raise click.BadParameter(f"element {i} ({item!r}) is not a token id; give whole numbers in "
                                     f"[0, {INT32_MAX}] separated by commas", param_hint=option)
        ids.append(int(t))
    return ids


@click.command("edgemoe-compile")
@click.argument("model_dir", type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Artifact directory to write.")
@click.option("--target", default="host", show_default=True, help="Board description in targets/.")
@click.option("--bits", "expert_bits", type=click.Choice(["2", "3", "4", "8", "16"]), default="4", show_default=True,
              help="Expert weight bitwidth (uniform; 16 = float16).")
@click.option("--trunk-bits", type=click.Choice(["auto", "4", "8", "32"]), default="auto", show_default=True,
              help="Bitwidth of the trunk's matrices (attention projections, embedding / LM head); 32 = float32; "
                   "auto: INT4 for a GGUF whose trunk matrices are all stored in ≤ 4.5-bit blocks (Q4_0, Q4_K, …), "
                   "else INT8.")
@click.option("--group", type=click.IntRange(1, 2**16), default=32, show_default=True,
              help="Quantization group size along the input dimension (must divide the model's matrix widths).")
@click.option("--max-seq", type=click.IntRange(1, UINT32_MAX), default=None,
              help="Longest context the artifact supports, at most the model's [model max, ≤ 2048].")
@click.option("--calibration", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Text to profile expert routing on: enables the path-table predictor and EdgeMoE eviction.")
@click.option("--calibration-tokens", type=click.IntRange(min=1), default=8192, show_default=True,
              help="Tokens of calibration text to use.")
@click.option("--expert-order", type=click.Choice(["coactivation", "index"]), default=None,
              help="Where each layer's expert records lie in experts.bin: experts often chosen together on the "
                   "calibration text side by side, so the runtime reads a layer's misses in fewer requests "
                   "(needs --calibration), or by expert index [default: coactivation with --calibration, else index].")
@click.option("--tolerance", type=_Percent(), default=None, metavar="P%",
              help="Choose each expert's bitwidth (INT8/4/3/2) by its sensitivity so perplexity rises at most "
                   "P% over the float model (needs --calibration); overrides --bits.")
@click.option("--max-bits", type=_Finite(2, 8), default=None, metavar="B",
              help="Choose each expert's bitwidth so the experts average at most B bits per weight, losing as "
                   "little as the experts' sensitivities allow (needs --calibration; with --tolerance, the more "
                   "compact of the two plans); overrides --bits.")
@click.option("--sensitivity", type=click.Choice(["auto", "measured", "estimated"]), default="auto", show_default=True,
              help="How the bit-plan search ranks experts: measured (one forward pass of the search text per expert "
                   "and bitwidth, the model in RAM), estimated (each expert's output error on its routed calibration "
                   "tokens, one pass, the model read layer by layer; plans still scored for real), or auto "
                   "(measured up to 100 M expert parameters).")
@click.option("--search-text", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Text the bit-plan search scores plans on (3/4) and checks them on (1/4): best text the model "
                   "was not trained on [default: the calibration text].")
@click.option("--int-dot/--no-int-dot", default=None,
              help="Integer-dot kernels (int8 activations, AVX-512 VNNI) [default: where the target has them].")
@click.option("--tune", is_flag=True, help="Tune kernels that have no record in the tuning store for this target "
                                           "(on this machine) and record them; later compiles reuse the records.")
@click.option("--jobs", type=click.IntRange(1, 4096), default=None,
              help="Worker processes rounding experts [default: one per core; 1, in the compile's own process, where "
                   "rounding there takes under 15 s, less than starting workers costs].")
@click.option("--dask-scheduler", default=None, metavar="HOST:PORT",
              help="Round experts on the workers of this running Dask scheduler instead of local processes (needs "
                   "pip install edgemoe[distributed]; the scheduler and workers need EdgeMoE, and the workers the "
                   "checkpoint at this machine's path).")
@click.option("--android-api", type=click.IntRange(21, 99), default=None,
              help="Android targets: the API level to build for (names the NDK compiler) [default: the target's].")
@click.option("--int4-grid", type=click.Choice(["auto", "half", "integer"]), default="auto", show_default=True,
              help="Levels of INT4 matrices: half-integers ±1/2…±15/2 (symmetric), or the integers -8…7 of "
                   "llama.cpp's Q4_0; auto: integer for a GGUF whose experts are Q4_0 (repacked, not rounded "
                   "again), else half. The trunk's INT4 matrices (--trunk-bits 4) are on the same grid.")
@click.option("--rounding", type=click.Choice(["search", "llamacpp"]), default="search", show_default=True,
              help="How weights are rounded: search (a searched scale per group; the output-error-minimising rounding "
                   "with --calibration), or llamacpp (llama-quantize's Q8_0 / Q4_0 blocks at --bits and --trunk-bits "
                   "8 or 4, INT4 on the integer grid: the codes a GGUF of this checkpoint holds).")
@click.option("--kv-cache", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="Element type of the KV cache the runtime keeps: float16 holds half the bytes per token of "
                   "context, as llama.cpp's default cache (decoder-only models).")
def compile_cmd(model_dir, out_dir, target, expert_bits, trunk_bits, group, max_seq, calibration, calibration_tokens,
                expert_order, tolerance, max_bits, sensitivity, search_text, int_dot, tune, jobs, dask_scheduler, android_api,
                int4_grid, rounding, kv_cache):
    """Compile the MoE checkpoint MODEL_DIR (a Hugging Face directory, a .gguf or a torch.onnx export's
    .onnx with config.json beside it) for a target board. An
    interrupted compile resumes from the experts it finished when run again with the same inputs."""
    from .compiler.driver import CompileOptions, compile_model
    from .compiler.expert_pool import RoundingLost
    from .compiler.tuning import TuningError
    from .models import ModelImportError
    from .progressbar import terminal_progress
    from .targets import UnknownTargetError
    from .targets.toolchain import ToolchainError

    if jobs is not None and dask_scheduler is not None:
        raise click.UsageError("--jobs and --dask-scheduler exclude each other: the experts are rounded on local "
                               "processes or on the Dask cluster's workers")
    if max_seq is not None:
        longest = _model_max_positions(model_dir)
        if longest is not None and max_seq > longest:
            raise click.BadParameter(f"{max_seq} is more than the model's maximum context {longest}; give "
                                     f"1..{longest}", param_hint="--max-seq")
    try:
        opts = CompileOptions(target, int(expert_bits), trunk_bits if trunk_bits == "auto" else int(trunk_bits), group,
                              max_seq, calibration,
                              calibration_tokens, tolerance=tolerance, max_bits=max_bits, sensitivity=sensitivity,
                              search_text=search_text, int_dot=int_dot, tune=tune, jobs=jobs, dask_scheduler=dask_scheduler,
                              android_api=android_api, int4_grid=int4_grid, rounding=rounding,
                              expert_order=expert_order, kv_cache=kv_cache)
        compile_model(model_dir, out_dir, opts, log=lambda m: click.echo(m, err=True), progress=terminal_progress)
    except (ModelImportError, UnknownTargetError, TuningError, ToolchainError, ValueError, FileNotFoundError,
            RoundingLost) as e:
        raise click.ClickException(str(e))


@click.command("edgemoe-package")
@click.argument("artifact", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The bundle to write: NAME.tar.gz (unpacks into NAME/).")
@click.option("--target", default=None, help="The board to package for: the artifact's target [default], checked.")
@click.option("--android-api", type=click.IntRange(21, 99), default=None,
              help="Android targets: the API level to build the runtime for [default: the target's].")
def package_cmd(artifact, out, target, android_api):
    """Bundle a compiled ARTIFACT with the runtime built for its target (edgemoe_run, libedgemoe.so,
    edgemoe.h) and a run script into one tar.gz to copy to the board."""
    from .bundle import BundleError, package
    from .targets import UnknownTargetError
    from .targets.toolchain import ToolchainError

    try:
        package(artifact, out, target, android_api, log=lambda m: click.echo(m, err=True))
    except (BundleError, ToolchainError, UnknownTargetError, ValueError) as e:
        raise click.ClickException(str(e))


def _model_max_positions(model_dir: Path) -> int | None:
    """The checkpoint's maximum positions (None where its description cannot be read: the compiler
    reports that)."""
    from .models import describe_model

    try:
        return describe_model(model_dir).max_positions
    except Exception:  # noqa: BLE001 - any unreadable checkpoint is the compiler's to report, with its reason
        return None


def _tuning_bar(groups):
    with click.progressbar(groups, label="tuning kernels", file=sys.stderr,
                           item_show_func=lambda g: g[0].kernel if g else "") as bar:
        yield from bar


@click.command("edgemoe-tune")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--target", default="host", show_default=True, help="Board description in targets/.")
@click.option("--bits", "bits_list", type=_NumberList(int, choices=(2, 3, 4, 8, 16)), default="2,3,4,8",
              show_default=True, help="Expert bitwidths to tune kernels for.")
@click.option("--trunk-bits", type=click.Choice(["4", "8", "32"]), default="8", show_default=True,
              help="Bitwidth of the trunk's matrices (attention projections, embedding / LM head); 32 = float32.")
@click.option("--group", type=click.IntRange(1, 2**16), default=32, show_default=True)
@click.option("--retune", is_flag=True, help="Tune again kernels that already have a record.")
@click.option("--store", "store_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Tuning store folder [default: $EDGEMOE_CACHE_DIR/tuning or ~/.cache/edgemoe/tuning].")
@click.option("--rpc", "rpc_server", metavar="HOST:PORT", default=None,
              help="Time on the board running a TVM RPC server there (python -m tvm.exec.rpc_server).")
@click.option("--rpc-tracker", metavar="HOST:PORT", default=None,
              help="Time on the boards a TVM RPC tracker lists under --rpc-key, several at once.")
@click.option("--rpc-key", default="", help="The key the boards registered with at the tracker (rpc_server --key).")
@click.option("--boards", type=click.IntRange(1, 1024), default=None,
              help="With --rpc-tracker: boards to use at once [default: every board the tracker lists for the key].")
@click.option("--minrpc", "minrpc_runtime", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None, metavar="DIR",
              help="Time on a board without Python: TVM's minimal RPC server, linked against the board's "
                   "libtvm_runtime.so and libtvm_ffi.so in DIR, started by --launcher.")
@click.option("--launcher", default=None, metavar="CMD",
              help="With --minrpc: the command prefix that runs a board program (e.g. a script copying it over "
                   "ssh) [default: the target's emulator here, qemu-user].")
@click.option("--number", type=click.IntRange(1, 100000), default=50, show_default=True,
              help="Calls per timed run (best of 3 runs).")
@click.option("--lanes", "lanes_list", type=_NumberList(int, choices=(4, 8, 16, 32, 64)), default="4,8,16,32,64",
              show_default=True, help="Candidate reduction lane counts of the float-dequantizing kernels.")
@click.option("--rounds", type=click.IntRange(1, 100), default=3, show_default=True,
              help="Rounds of the integer-dot kernels' search (each times every schedule one knob away from the "
                   "best so far; it stops early when a round finds nothing faster).")
@click.option("--int-dot/--no-int-dot", default=None,
              help="Tune the kernels of a compile with (without) integer-dot kernels [default: as edgemoe-compile "
                   "would choose for the target].")
@click.option("--caches", type=click.Choice(["auto", "cold", "warm"]), default="auto", show_default=True,
              help="Time kernels here with their weights out of the CPU caches (cold) or in them (warm); auto: "
                   "cold where the model's weights at these bits exceed the last-level cache, as decode then "
                   "streams them from memory.")
def tune_cmd(model_dir, target, bits_list, trunk_bits, group, retune, store_dir, rpc_server, rpc_tracker, rpc_key,
             boards, minrpc_runtime, launcher, number, lanes_list, rounds, int_dot, caches):
    """Tune the decode kernels of MODEL_DIR's shapes into the tuning store: candidates built here and
    timed on this machine, on boards through TVM RPC, or on a board running TVM's minimal RPC server."""
    import shlex

    from .compiler.driver import CompileOptions, weight_layout
    from .compiler.kernels import decode_kernels
    from .compiler.measure import MeasureError, MinRPC, Remote, local_measurer
    from .compiler.tuning import TuningError, TuningStore, kernel_key, label, runs_here, tunable, tune
    from .models import ModelImportError, load_model
    from .targets import UnknownTargetError, load_target, toolchain

    if sum(x is not None for x in (rpc_server, rpc_tracker, minrpc_runtime)) > 1:
        raise click.UsageError("give at most one of --rpc, --rpc-tracker and --minrpc")
    try:
        tgt = load_target(target)
        measurer = None
        if rpc_server or rpc_tracker:
            measurer = Remote(rpc_server, rpc_tracker, rpc_key, boards, number=number)
        elif minrpc_runtime is not None:
            prefix = shlex.split(launcher) if launcher is not None else list(toolchain.emulator(tgt).prefix)
            cxx = toolchain.require_program(f"{toolchain.arch_of(tgt)}-linux-gnu-g++",
                                            "the C++ compiler for the minimal RPC server")
            measurer = MinRPC(minrpc_runtime, prefix, cxx, number=number)
        model = load_model(model_dir)
        cfg = model.config
        bits = list(bits_list)
        if measurer is None and runs_here(tgt):  # elsewhere tune() says how to time on the board
            counts = model.parameter_counts()
            measurer = local_measurer(counts["experts"] * max(bits) // 8 + counts["trunk"] * int(trunk_bits) // 8,
                                      number, caches)
        # the kernels edgemoe-compile would build, with the builders of the integer-dot ones' variants
        layout = weight_layout(cfg, tgt, CompileOptions(target, trunk_bits=int(trunk_bits), group=group,
                                                        int_dot=int_dot), bits)
        variants: dict = {}
        funcs = decode_kernels(cfg, bits, group, int(trunk_bits), layout, tgt.tvm(), variants=variants)
        store = TuningStore(tgt, store_dir)
        tuned = tune(funcs, tgt, store, candidates=tuple(lanes_list), number=number, retune=retune,
                     progress=_tuning_bar, measurer=measurer, variants=variants, rounds=rounds)
    except (ModelImportError, UnknownTargetError, TuningError, MeasureError, toolchain.ToolchainError,
            ValueError) as e:
        raise click.ClickException(str(e))
    where = measurer.where if measurer is not None else "this machine"
    click.echo(f"tuning store {store.path}: {len(tuned)} kernels tuned now, timed on {where}")
    click.echo("| kernel | schedule | µs | hand schedule µs | × hand | measured on |")
    click.echo("|---|---|---|---|---|---|")
    for name in tunable(funcs, variants):
        rec = store.records[kernel_key(name, funcs[name])]
        click.echo(f"| {name} | {label(rec['schedule'])} | {rec['us']:.2f} | {rec['default_us']:.2f} | "
                   f"{rec['default_us'] / rec['us']:.2f} | {rec.get('measured_on', 'this machine')} |")


MAX_EMULATE_GIGA = 1e6  # as edgemoe_run --emulate-compute


def _emulation_figures(spec: str, option: str, fields: tuple, form: str, example: str):
    """A device spec given as comma-separated numbers (`fields`: (name, lowest, open, highest, scale)
    each, checked in order and scaled) or as a target name: the scaled numbers, or the target."""
    from .targets import UnknownTargetError, load_target

    if "," in spec:
        parts = spec.split(",")
        if len(parts) != len(fields):
            raise click.BadParameter(f"{spec!r} is not {form}, e.g. {example}", param_hint=option)
        try:
            return tuple(_check_number(v, float, lo, hi, lo_open=lo_open, what=name) * scale
                         for v, (name, lo, lo_open, hi, scale) in zip(parts, fields))
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint=option) from None
    try:
        return load_target(spec)
    except UnknownTargetError as e:
        raise click.BadParameter(f"{e} (or give {form.split(':')[0]} such as {example})", param_hint=option) from None


def _compute_emulation(spec: str, option: str = "--emulate-compute") -> tuple[float, float, float] | None:
    """(memory bandwidth B/s, int8 ops/s, fp32 FLOP/s) from a target name (its "compute" entry) or
    "GBPS,GOPS,GFLOPS" (each > 0, as edgemoe_run --emulate-compute); "none": None (this machine's speed)."""
    if spec == "none":
        return None
    got = _emulation_figures(spec, option, tuple((name, 0, True, MAX_EMULATE_GIGA, 1e9)
                                                for name in ("GBPS", "GOPS", "GFLOPS")),
                             "GBPS,GOPS,GFLOPS: memory bandwidth in GB/s, int8 and fp32 throughput in G "
                             "operations/s, each > 0", "4.8,48,24")
    if isinstance(got, tuple):
        return got
    figures = got.compute_emulation()
    if figures is None:
        raise click.UsageError(f"target {spec!r} describes no board compute to emulate (no \"compute\" entry)")
    return figures


def _storage_emulation(spec: str, option: str = "--emulate-storage") -> tuple[float, float]:
    """(bandwidth B/s, latency s) from a target name or "MBPS,MS" (MBPS > 0, MS >= 0, both finite;
    as edgemoe_run --emulate)."""
    got = _emulation_figures(spec, option, (("MBPS", 0, True, MAX_EMULATE_MBPS, 1e6),
                                            ("MS", 0, False, MAX_EMULATE_MS, 1e-3)),
                             "MBPS,MS: bandwidth in MB/s (> 0) and latency in ms (>= 0)", "45,1")
    if isinstance(got, tuple):
        return got
    st = got.storage
    if not st.get("read_bandwidth_bytes_per_s"):
        raise click.UsageError(f"target {spec!r} describes no storage speed to emulate")
    return float(st["read_bandwidth_bytes_per_s"]), float(st.get("read_latency_s") or 0.0)


@click.command("edgemoe-run")
@click.argument("artifact", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--prompt", help="Text to continue (uses the artifact's tokenizer.json).")
@click.option("--tokens", help="Comma-separated token ids to continue, instead of --prompt.")
@click.option("-n", "n_new", type=click.IntRange(0, INT32_MAX), default=64, show_default=True,
              help="Tokens to generate at most (generation stops at the model's end-of-sequence token); the "
                   "prompt and these must fit the context.")
@click.option("--temperature", type=_Finite(0, 100), default=0.0, show_default=True,
              help="Sampling temperature; 0 = greedy.")
@click.option("--top-k", type=click.IntRange(0, UINT32_MAX), default=0, show_default=True,
              help="Sample among the k most likely tokens [0: all].")
@click.option("--top-p", type=_Finite(0, 1), default=1.0, show_default=True,
              help="Sample among the fewest most likely tokens whose probability reaches p (> 0).")
@click.option("--repetition-penalty", type=_Finite(0, 100), default=1.0, show_default=True,
              help="> 1 makes tokens already in the context less likely (> 0).")
@click.option("--seed", type=click.IntRange(0, 2**64 - 1), default=0, show_default=True,
              help="The random sequence of the sampler: the same seed gives the same text (as edgemoe_run's).")
@click.option("--budget", type=_Bytes(), default=None,
              help="Memory budget for the runtime (trunk + KV cache + buffers + expert cache): whole bytes or a "
                   "number with a unit (KB, MB, GB; KiB, MiB, GiB), e.g. 24MiB, rounded down to whole bytes. "
                   "Default: every expert resident.")
@click.option("--cache-fraction", type=_Finite(0, 1), default=None,
              help="Instead of --budget: a budget whose expert cache holds this fraction of all experts "
                   "(0: the minimum budget).")
@click.option("--max-seq", type=click.IntRange(0, UINT32_MAX), default=0,
              help="Context to allocate, at most the artifact's [0: the artifact maximum].")
@click.option("--no-verify", is_flag=True, help="Skip the CRC-32 check of each expert record read.")
@click.option("--predictor", type=click.Choice(["auto", "none", "path-table", "next-router", "fitted-router", "wrong"]),
              default="auto", show_default=True,
              help="How next-layer experts are predicted for prefetching; auto: fitted-router where the artifact "
                   "was compiled with calibration text, else next-router.")
@click.option("--eviction", type=click.Choice(["auto", "lru", "fifo", "edgemoe"]), default="auto", show_default=True,
              help="auto: edgemoe where the artifact was compiled with calibration text, else lru.")
@click.option("--prefetch", "prefetch_experts", type=click.IntRange(0, UINT32_MAX), default=0,
              help="Experts to prefetch per layer, at most the experts per layer [0: top-k].")
@click.option("--prefetch-margin", type=_Finite(0, 100), default=0.0, show_default=True,
              help="Prefetch a confidence-driven number of experts: the predicted top-k and each further one within "
                   "this many logits of the k-th, at most --prefetch (0 there: 2 · top-k). 0: exactly --prefetch.")
@click.option("--prefetch-layers", type=click.IntRange(1, 4), default=1, show_default=True,
              help="Layers with experts to prefetch ahead: 2 also guesses the layer after the next, so a read has "
                   "two layers' compute to arrive in (storage slower to answer than a layer computes: a phone's UFS).")
@click.option("--preload", is_flag=True,
              help="Fill the expert cache when the artifact is opened with the experts the calibration text chose "
                   "most, in runs of adjacent records, so the first tokens do not miss on each first use.")
@click.option("--one-read-per-record", is_flag=True,
              help="Read each expert record in its own request (default: records queued together that lie side by "
                   "side in experts.bin are read in one).")
@click.option("--prefill-tokens", type=click.IntRange(1, 1024), default=None,
              help="Prompt tokens run through each layer together: an expert several of them chose is read once for "
                   "all of them [default: the runtime's, 64]; 1: token by token, as decoding.")
@click.option("--no-loader-thread", is_flag=True, help="Read experts on the decode thread (no prefetching).")
@click.option("--storage", type=click.Choice(["pread", "mmap"]), default="pread", show_default=True)
@click.option("--direct-io", is_flag=True, help="Open the expert image with O_DIRECT (bypass the page cache).")
@click.option("--emulate-storage", metavar="TARGET|MBPS,MS",
              help="Stretch each expert read to a device's speed: a target name (its storage entry) "
                   "or bandwidth in MB/s and latency in ms, e.g. 45,1.")
@click.option("--emulate-compute", metavar="TARGET|GBPS,GOPS,GFLOPS",
              help="Make each kernel last as long as on a board: a target name (its compute entry) or memory "
                   "bandwidth in GB/s, int8 and fp32 throughput in G operations/s, e.g. 4.8,48,24.")
@click.option("--threads", type=click.IntRange(1, MAX_THREADS), default=1, show_default=True,
              help="Compute threads for the kernels' parallel loops (the loader thread is extra).")
@click.option("--readers", type=click.IntRange(1, 16), default=1, show_default=True,
              help="Expert reads in flight at once (reader threads): more than 1 pays on storage that overlaps "
                   "requests (UFS, NVMe; a target's storage queue_depth).")
def run_cmd(artifact, prompt, tokens, n_new, temperature, top_k, top_p, repetition_penalty, seed, budget,
            cache_fraction, max_seq, no_verify, predictor, eviction, prefetch_experts, prefetch_margin,
            prefetch_layers, preload, one_read_per_record, prefill_tokens, no_loader_thread, storage, direct_io,
            emulate_storage, emulate_compute, threads, readers):
    """Generate text with a compiled ARTIFACT in the C runtime and report speed, memory and cache behaviour."""
    from .api import Session
    from .runtime import EdgeMoEError

    if (prompt is None) == (tokens is None):
        raise click.UsageError("give exactly one of --prompt or --tokens")
    if budget is not None and cache_fraction is not None:
        raise click.UsageError("give --budget or --cache-fraction, not both")
    ids = _token_ids(tokens) if tokens is not None else None
    emulate = _storage_emulation(emulate_storage) if emulate_storage else None
    board_compute = _compute_emulation(emulate_compute) if emulate_compute else None
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                    seed=seed)
    try:
        with Session(artifact, budget=budget, cache_fraction=cache_fraction, max_seq=max_seq, verify=not no_verify,
                     storage=storage, direct_io=direct_io, emulate=emulate, loader_thread=not no_loader_thread,
                     predictor=predictor, prefetch_experts=prefetch_experts, prefetch_margin=prefetch_margin,
                     prefetch_layers=prefetch_layers, preload=preload, coalesce=not one_read_per_record,
                     prefill_tokens=prefill_tokens or 0, eviction=eviction,
                     threads=threads, readers=readers, emulate_compute=board_compute) as s:
            if prompt is not None:
                ids = s.tokenizer.encode(prompt).ids
            if not ids:
                raise click.UsageError("the prompt encodes to no tokens")
            _check_against_artifact(s.info, len(ids), n_new, max_seq, prefetch_experts)
            out, t0 = [], time.perf_counter()
            t1 = t0  # when the prompt has been read: the first token is out
            if prompt is not None:  # text: streamed as it is generated
                click.echo(prompt, nl=False)
                for piece in s.generate(ids, n_new, **sampling):
                    t1 = t1 if out else time.perf_counter()
                    out.append(piece)
                    click.echo(piece, nl=False)
                click.echo("")
            else:
                for token in s.tokens(ids, n_new, **sampling):
                    t1 = t1 if out else time.perf_counter()
                    out.append(token)
                click.echo(",".join(map(str, out)))
            t2 = time.perf_counter()
            st, info, chosen = s.stats(), s.info, (s.info["predictor"], s.info["eviction"])
    except (EdgeMoEError, FileNotFoundError) as e:
        raise click.ClickException(str(e))
    n_out = st["tokens"] - len(ids)  # decode steps after the prompt
    uses = st["expert_hits"] + st["expert_misses"]
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    click.echo("", err=True)
    click.echo(f"prefill: {len(ids)} tokens in {t1 - t0:.3f} s ({len(ids) / max(t1 - t0, 1e-9):.1f} tok/s)", err=True)
    click.echo(f"decode: {n_out} tokens in {t2 - t1:.3f} s ({n_out / max(t2 - t1, 1e-9):.1f} tok/s)", err=True)
    click.echo(f"memory: runtime {fmt_bytes(st['memory_bytes'])} (trunk {fmt_bytes(st['trunk_bytes'])}, "
               f"KV cache {fmt_bytes(st['kv_cache_bytes'])} float{info['kv_cache_bits']}, "
               f"expert cache {st['cache_slots']} slots = {fmt_bytes(st['expert_cache_bytes'])}); "
               f"process peak RSS {fmt_bytes(peak_rss)}", err=True)
    click.echo(f"expert cache: hit rate {st['expert_hits'] / max(uses, 1):.1%} ({st['expert_hits']} hits, "
               f"{st['expert_misses']} misses); read {fmt_bytes(st['bytes_read'] / max(st['tokens'], 1))}/token "
               f"({st['records_read']} records in {st['read_requests']} requests"
               + (f", {st['preloaded']} of them preloaded" if preload else "") + f"), I/O {st['read_ns'] / 1e6:.1f} ms, stalled {st['stall_ns'] / 1e6:.1f} ms, "
               f"compute {st['compute_ns'] / 1e6:.1f} ms"
               + (f" (of which {st['board_wait_ns'] / 1e6:.1f} ms matching the emulated board)" if board_compute else "")
               + f"; {chosen[1]} eviction", err=True)
    if st["predicted"]:
        ahead = f" ({st['predicted_ahead_hits'] / st['predicted_ahead']:.1%} by guesses two or more layers ahead)" \
            if st["predicted_ahead"] else ""
        click.echo(f"prediction ({chosen[0]}): {st['predicted_hits'] / st['predicted']:.1%} of chosen experts "
                   f"predicted{ahead}; prefetches {st['prefetch_issued']} issued, {st['prefetch_used']} used, "
                   f"{st['prefetch_wasted']} evicted or cancelled unused"
                   + (f", {st['prefetch_declined']} declined while the link was busier than such guesses were right"
                      if st["prefetch_declined"] else ""), err=True)


def _check_against_artifact(info: dict, n_prompt: int, n_new: int, max_seq: int, prefetch: int) -> None:
    """The numbers only the opened artifact can check: the context it holds, its experts per layer."""
    ctx = info["max_seq"]  # the session's: min(--max-seq, the artifact's maximum)
    if max_seq > ctx:
        raise click.BadParameter(f"{max_seq} is more than this artifact's maximum context {ctx}; give 0..{ctx} "
                                 f"(0 = {ctx})", param_hint="--max-seq")
    if n_prompt + n_new > ctx:
        raise click.BadParameter(f"{n_prompt} prompt tokens + {n_new} new tokens need {n_prompt + n_new} positions "
                                 f"but the context holds {ctx}: give -n 0..{max(ctx - n_prompt, 0)}"
                                 + (" or raise --max-seq" if 0 < max_seq < ctx else ""), param_hint="-n")
    if prefetch > info["num_experts"]:
        raise click.BadParameter(f"{prefetch} is more than the {info['num_experts']} experts of a layer; give "
                                 f"0..{info['num_experts']} (0 = top-k)", param_hint="--prefetch")


def main():  # pragma: no cover - `python -m edgemoe.cli`
    sys.exit(run_cmd())


@click.command("edgemoe-eval")
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--text", "text_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="Held-out text to score.")
@click.option("--tokens", "n_tokens", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Tokens of the text to score.")
@click.option("--window", type=click.IntRange(2, UINT32_MAX), default=256, show_default=True,
              help="Context per window (non-overlapping).")
@click.option("--bits", type=click.Choice(["2", "3", "4", "8", "16"]), default=None,
              help="For a model directory: score it with its experts quantized to this bitwidth (and the trunk "
                   "to --trunk-bits), as an artifact would store it.")
@click.option("--trunk-bits", type=click.Choice(["4", "8", "32"]), default="8", show_default=True,
              help="Bitwidth of the trunk's matrices (attention projections, embedding / LM head); 32 = float32.")
@click.option("--target", default="host", show_default=True,
              help="With --bits: the board whose kernels to reproduce (integer-dot kernels round activations).")
@click.option("--calibration", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="With --bits: round experts against their inputs on this text, as edgemoe-compile "
                   "--calibration does (else: searched scales only).")
@click.option("--calibration-tokens", type=click.IntRange(min=1), default=8192, show_default=True)
def eval_cmd(path, text_path, n_tokens, window, bits, trunk_bits, target, calibration, calibration_tokens):
    """Perplexity of PATH over held-out text: a model directory (NumPy reference, float or --bits)
    or a compiled artifact (the C runtime)."""
    from tokenizers import Tokenizer

    from .evaluate import perplexity_artifact, perplexity_reference

    tok_path = path / "tokenizer.json"
    if not tok_path.is_file():
        raise click.ClickException(f"{tok_path} not found: the text must be tokenized with the model's tokenizer")
    text = text_path.read_text(encoding="utf-8", errors="replace")[: n_tokens * 8]
    ids = Tokenizer.from_file(str(tok_path)).encode(text).ids[:n_tokens]

    def progress(items):
        with click.progressbar(items, label="windows", file=sys.stderr) as bar:
            yield from bar

    if (path / "manifest.json").is_file():
        ctx = json.loads((path / "manifest.json").read_text()).get("max_seq")
        if ctx and window > ctx:
            raise click.BadParameter(f"{window} is more than the artifact's maximum context {ctx}; give 2..{ctx}",
                                     param_hint="--window")
        r, what = perplexity_artifact(path, ids, window, progress), f"artifact {path} (C runtime)"
    else:
        from .compiler.driver import CompileOptions, weight_layout
        from .compiler.quantize import compiled_trunk, quantized_model
        from .models import load_model
        from .targets import UnknownTargetError, load_target

        model = load_model(path)
        layout = None
        if bits:
            try:
                opts = CompileOptions(target, int(bits), int(trunk_bits))
                layout = weight_layout(model.config, load_target(target), opts, [int(bits)])
            except UnknownTargetError as e:
                raise click.ClickException(str(e))
            moments = None
            if calibration is not None:
                from .compiler.profile import expert_moments, tokenize_file

                moments = expert_moments(compiled_trunk(model, int(trunk_bits), opts.group, layout),
                                         tokenize_file(tok_path, calibration, calibration_tokens))
            model = quantized_model(model, int(bits), int(trunk_bits), opts.group, layout, moments)
        r = perplexity_reference(model, ids, window, progress)
        kind = (f"INT{bits} experts{' rounded on ' + calibration.name if calibration else ''}, trunk {'float32' if trunk_bits == '32' else 'INT' + trunk_bits}, "
                f"{'integer-dot' if layout == 'tiles' else 'float-dequantizing'} kernels for {target}") if bits else "float"
        what = f"model {path} ({kind}, NumPy reference)"
    click.echo(f"{what}: perplexity {r['perplexity']:.3f} (mean NLL {r['nll']:.4f}) over {r['tokens']} tokens "
               f"of {text_path.name}")
