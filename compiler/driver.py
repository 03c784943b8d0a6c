"""The compile flow: import → quantize → pack the expert image → lower kernels → emit the artifact."""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import resource
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from ..models import describe_model, load_model, read_stored
from ..models.stored_tensor import LazyTensor
from ..targets import load_target, toolchain
from .bitplan import LEVELS, BitPlan, search_plan, sensitivity_method, split_tokens
from .cache import cache_dir
from .expert_image import ImageWriter
from .expert_pool import ExpertPool, RoundingTask, default_jobs, record_code_digest
from .layer_pass import LayerPass, grams
from .llamacpp_rounding import llamacpp_rounded
from .plan_pass import search_plan_estimated
from .kernels import check_kv_cache
from .lower import build_kernels
from .progress import stage, track
from .tuning import TuningStore
from .profile import expert_moments, profile_routing, tokenize_file
from .quantize import (DEFAULT_GROUP, DEFAULT_TRUNK_BITS, check_bits, check_grid, check_trunk_bits, compiled_trunk,
                       grid_at, with_matrices)
from .rounding import level_range
from .cpu_features import elf_machine, feature_names, required_features
from .tokenizer_file import write_tokenizer
from .trunk_file import ArtifactIdentity, write_trunk

MANIFEST_VERSION = 1


@dataclass
class CompileOptions:
    target: str = "host"
    expert_bits: int = 4
    trunk_bits: int | str = "auto"  # attention projections and embedding / LM head; 32 = float32; auto: trunk_bits()
    group: int = DEFAULT_GROUP
    max_seq: int | None = None  # context the artifact supports; default: min(model maximum, 2048)
    calibration: Path | None = None  # text for profiling expert routing (predictor tables, eviction frequencies)
    calibration_tokens: int = 8192
    bit_plan: list[list[int]] | None = None  # bits per [layer][expert]; overrides expert_bits
    tolerance: float | None = None  # search a per-expert bit plan within this relative perplexity loss
    max_bits: float | None = None  # search a per-expert bit plan this small (average bits per expert weight)
    sensitivity: str = "auto"  # how the search ranks experts: "measured", "estimated", or by model size (bitplan.py)
    search_text: Path | None = None  # text the search scores plans on; default: the calibration text
    int_dot: bool | None = None  # integer-dot kernels (tiles layout); None: wherever the target and shapes allow
    tune: bool = False  # tune kernels that have no record in the tuning store (then record them)
    tuning_dir: Path | None = None  # the tuning store's folder; default <cache>/tuning
    jobs: int | None = None  # worker processes rounding experts; default: one per core (expert_pool.default_jobs)
    dask_scheduler: str | None = None  # round experts on this Dask cluster (HOST:PORT) instead; overrides jobs
    android_api: int | None = None  # Android targets: the API level to build for; default: the target's
    int4_grid: str = "auto"  # INT4 matrices' levels (quantize.GRIDS), experts' and trunk's; auto: "integer" for Q4_0 experts
    rounding: str = "search"  # ROUNDINGS: searched scales (GPTQ with calibration), or llama.cpp's Q8_0 / Q4_0 rule
    # where a layer's records lie in experts.bin: "coactivation" (profile.py; needs calibration) or "index";
    # None: coactivation with calibration text, else index
    expert_order: str | None = None
    kv_cache: str = "float32"  # the KV cache's element type (program.KV_CACHE_DTYPES): float16 halves it


# How weights are rounded: "search", scales searched per group (against calibration inputs where
# given: rounding.py); "llamacpp", llama-quantize's Q8_0 / Q4_0 blocks (llamacpp_rounding.py), so a
# checkpoint compiles to the codes its GGUF holds.
ROUNDINGS = ("search", "llamacpp")


def expert_bit_plan(cfg, opts: CompileOptions) -> list[list[int]]:
    """Bits of each [layer][expert] (the layers with experts): the options' plan, checked, or the uniform
    bitwidth."""
    layers = cfg.num_moe_layers
    if opts.bit_plan is None:
        check_bits(opts.expert_bits)
        return [[opts.expert_bits] * cfg.num_experts for _ in range(layers)]
    plan = [[int(b) for b in row] for row in opts.bit_plan]
    if len(plan) != layers or any(len(row) != cfg.num_experts for row in plan):
        raise ValueError(f"bit plan must be {layers} layers (those with experts) × {cfg.num_experts} experts")
    for b in {b for row in plan for b in row}:
        check_bits(b)
    return plan


def trunk_bits(model, opts: CompileOptions) -> int:
    """The trunk matrices' bitwidth: the options', or (auto) INT4 where every one of them is stored in
    at most 4.5 bits per weight (a GGUF whose trunk is Q4_0 blocks or narrower: kept at its own
    precision, Q4_0 copied), else the default INT8 (a float checkpoint; a GGUF whose mix keeps some
    trunk matrices at Q8_0 or Q6_K, as llama-quantize's Q4_0 and Q4_K_M do)."""
    if opts.trunk_bits != "auto":
        check_trunk_bits(opts.trunk_bits)
        return opts.trunk_bits
    stored = []  # bits per weight of each trunk matrix as the checkpoint stores it (None: not stored as such)

    def note(w):
        stored.append(w.stored_bits() if isinstance(w, LazyTensor) else None)
        return w

    with_matrices(model, lambda li, ei, e: e, note)
    q4_0_bits = 4 + 16 / 32  # a Q4_0 block: 32 four-bit levels and a float16 scale
    return 4 if stored and None not in stored and max(stored) <= q4_0_bits else DEFAULT_TRUNK_BITS


def int4_grid(model, opts: CompileOptions) -> str:
    """The levels of the artifact's INT4 matrices (experts and trunk: one grid, so one set of kernel
    centres): the options', or (auto) "integer" where every routed expert
    matrix is stored as Q4_0 blocks of the compile's group (a GGUF's: repacked unrounded), else "half"."""
    if opts.int4_grid != "auto":
        check_grid(4, opts.int4_grid)
        return opts.int4_grid
    lo, hi, _ = level_range(4, "integer")

    def q4_0(w):
        bounds = w.level_bounds(opts.group) if isinstance(w, LazyTensor) else None
        return bounds is not None and lo <= bounds[0] and bounds[1] <= hi

    on_grid = all(q4_0(w) for layer in model.moe_layers for e in layer.experts
                  for w in (e.w_gate, e.w_up, e.w_down) if w is not None)
    return "integer" if on_grid else "half"


EXPERT_ORDERS = ("coactivation", "index")


def resolved_expert_order(opts: CompileOptions) -> str:
    """The order of a layer's records in experts.bin (CompileOptions.expert_order), checked."""
    order = opts.expert_order or ("coactivation" if opts.calibration is not None else "index")
    if order not in EXPERT_ORDERS:
        raise ValueError(f"unknown expert order {order!r}; one of {', '.join(EXPERT_ORDERS)}")
    if order == "coactivation" and opts.calibration is None:
        raise ValueError("--expert-order coactivation sets experts by their routing on calibration text: give "
                         "--calibration, or use --expert-order index")
    return order


def check_rounding(opts: CompileOptions, search: bool) -> None:
    """ValueError naming the fix where `opts.rounding` is unknown or cannot hold with the other options."""
    if opts.rounding not in ROUNDINGS:
        raise ValueError(f"unknown rounding {opts.rounding!r}; one of {', '.join(ROUNDINGS)}")
    if opts.rounding != "llamacpp":
        return
    if search:
        raise ValueError("--rounding llamacpp rounds every expert as llama-quantize would at its one bitwidth; a "
                         "bit-plan search (--tolerance, --max-bits) chooses and rounds them itself: drop one of the two")
    if opts.int4_grid == "half" and 4 in {opts.expert_bits, opts.trunk_bits} | {b for row in opts.bit_plan or [] for b in row}:
        raise ValueError("--rounding llamacpp stores INT4 as Q4_0 does, on the integer grid: drop --int4-grid half")


def weight_layout(cfg, target, opts: CompileOptions, bits_used: list[int]) -> str:
    """"tiles" (integer-dot kernels) when the target has the instruction and every quantized matrix
    fits the layout; otherwise "rows" (float-dequantizing kernels). Asking for int_dot where it
    cannot run is an error."""
    from . import int_dot
    from .quantize import tiles_fit

    hdim, idim = cfg.hidden_size, cfg.expert_intermediate
    shapes = [(idim, hdim, b) for b in bits_used] + [(hdim, idim, b) for b in bits_used]
    if opts.trunk_bits != 32:
        trunk = [(hdim, cfg.attn_out_dim), (cfg.vocab_size, hdim)]
        if cfg.attention == "mla":
            trunk += [(cfg.num_heads * cfg.qk_head_dim, cfg.q_lora_rank or hdim), (cfg.kv_lora_rank + cfg.head_dim, hdim)]
            trunk += [(cfg.q_lora_rank, hdim)] if cfg.q_lora_rank else []
        else:
            trunk.append((cfg.q_dim + 2 * cfg.kv_dim, hdim))
        for sdim in (cfg.shared_expert_intermediate, cfg.dense_intermediate):  # resident MLPs
            trunk += [(sdim, hdim), (hdim, sdim)] if sdim else []
        if cfg.encoder_layers:  # the decoder's cross-attention projections
            trunk += [(cfg.q_dim, hdim), (2 * cfg.kv_dim, hdim)]
        shapes += [(r, k, opts.trunk_bits) for r, k in trunk]
    why_not = None
    if not int_dot.supported(target.tvm()):
        why_not = f"target {target.name} has none of {', '.join(i.feature for i in int_dot.ISAS)}"
    elif 16 in bits_used:
        why_not = "float16 experts have no tiles layout"
    elif not all(tiles_fit(n, k, b, opts.group) for n, k, b in shapes):
        why_not = "a weight matrix's rows are not a multiple of 16 (or the group is not whole words)"
    if opts.int_dot and why_not:
        raise ValueError(f"integer-dot kernels unavailable: {why_not}; compile without --int-dot")
    return "tiles" if opts.int_dot is not False and why_not is None else "rows"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_output_dir(out_dir: Path) -> None:
    """An output directory is new, empty or an earlier artifact (which the compile replaces whole)."""
    if out_dir.exists() and (not out_dir.is_dir() or
                             (any(out_dir.iterdir()) and not (out_dir / "manifest.json").is_file())):
        raise ValueError(f"{out_dir} exists and is not an EdgeMoE artifact (no manifest.json); choose a new output "
                         "directory or remove it (nothing in it was changed)")


def _publish(work: Path, out_dir: Path) -> None:
    """Moves a finished artifact from its working directory into place: out_dir changes from the
    old artifact (if any) to the new one by renames, never holding a partial one. The working
    directory's own files (dot-named: what the compile's inputs were) are left out."""
    for p in work.glob(".*"):
        p.unlink()
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
        os.rmdir(old)
        os.rename(out_dir, old)
    os.rename(work, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# Options that choose where experts are rounded, not what the records hold.
WHERE_OPTIONS = ("jobs", "dask_scheduler")


def compile_inputs(model_dir: Path, opts: CompileOptions) -> bytes:
    """A digest of what a compile's expert records depend on: the checkpoint's files (names, sizes,
    modification times), the calibration and search texts likewise, the options (but not how many
    workers round, or where) and the code that rounds and writes them."""
    h = hashlib.sha256()
    # a checkpoint file (.gguf, .onnx) with what lies beside it: its config.json, external data, tokenizer
    folder = model_dir.parent if model_dir.is_file() else model_dir
    files = sorted(p for p in folder.iterdir() if p.is_file())
    for p in files + [Path(t) for t in (opts.calibration, opts.search_text) if t is not None]:
        st = p.stat()
        h.update(f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    h.update(json.dumps({k: v for k, v in asdict(opts).items() if k not in WHERE_OPTIONS}, default=str,
                        sort_keys=True).encode())
    h.update(record_code_digest())
    return h.digest()


@contextmanager
def working_directory(out_dir: Path, inputs: bytes):
    """The compile's working directory beside out_dir, held by this process alone (a lock): the
    one an interrupted compile with the same inputs left (its finished records are reused), else
    a fresh one."""
    work = out_dir.parent / f".{out_dir.name}.partial"
    work.mkdir(exist_ok=True)
    fd = os.open(work, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"another compile is writing {out_dir} (its working directory {work} is locked); "
                             "wait for it or choose another output directory") from None
        stamp = work / ".inputs"
        if not stamp.is_file() or stamp.read_bytes() != inputs:
            for p in work.iterdir():
                shutil.rmtree(p) if p.is_dir() else p.unlink()
            stamp.write_bytes(inputs)
        yield work
    finally:
        os.close(fd)


def peak_rss() -> int:
    """Bytes: the largest resident set of this process, and of the largest of its finished workers."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, workers) * 1024


def cpu_seconds() -> float:
    """User and system time of this process and of its finished workers."""
    own, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime


def compile_model(model_dir: str | Path, out_dir: str | Path, opts: CompileOptions, log=print, progress=None) -> dict:
    """Compile the checkpoint in model_dir into an artifact directory; returns the manifest.
    `log` receives one line per finished stage. `progress`, a progress factory (compiler/progress.py:
    called as tqdm is, returning the iterable it is given, counted), is told of every long stage:
    import, calibration, bit-plan search, rounding each expert, routing profile, tuning, lowering,
    writing; None (the default) reports none of them.
    The artifact is written into a working directory beside out_dir and renamed into place when
    complete: a failed or interrupted compile leaves out_dir as it was. One interrupted (Ctrl-C, a
    signal, a crash, a Dask cluster losing its tasks) or failed on anything but its inputs (a read,
    a full disk, a bug in a late stage) also leaves its working directory, and the same compile run
    again resumes from the expert records it finished; one that fails on its inputs (ValueError)
    removes it."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    check_output_dir(out_dir)
    target = load_target(opts.target).with_android_api(opts.android_api)
    # the linker kernels.so needs, found before anything is imported, quantized or written
    cc = toolchain.compiler(target) if target.kernel_library == "shared" else None
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with working_directory(out_dir, compile_inputs(model_dir, opts)) as work:
        try:
            manifest = _compile_into(model_dir, work, opts, target, cc, log, progress, (work / ".inputs").read_bytes())
            _publish(work, out_dir)
        except ValueError:  # the inputs are wrong: running the same command again would fail the same way
            shutil.rmtree(work, ignore_errors=True)
            raise
        except BaseException:  # interrupted, or failed on something else (a read, the disk, a bug): keep the work
            log(f"stopped: {work} keeps the expert records finished so far; the same command resumes from them")
            raise
    log(f"artifact written to {out_dir} in {manifest['compile_seconds']} s; peak RSS {peak_rss() / 2**30:.2f} GiB")
    return manifest


def place_tokenizer(model_dir: Path, out_dir: Path) -> Path | str:
    """Puts the checkpoint's tokenizer.json (and tokenizer_config.json) into the artifact: an HF
    directory's own, the ones beside a GGUF or ONNX file, or made from the vocabulary the GGUF carries.
    Returns the artifact's tokenizer.json, or why there is none."""
    from ..models.gguf_import import gguf_file, read_vocabulary, tokenizer_files

    gguf = gguf_file(model_dir)
    source = model_dir if model_dir.is_dir() else model_dir.parent
    if (source / "tokenizer.json").is_file():
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (source / name).is_file():
                shutil.copy(source / name, out_dir / name)
        return out_dir / "tokenizer.json"
    vocab = read_vocabulary(gguf) if gguf is not None else None
    if vocab is None:
        return "no tokenizer.json"
    made = tokenizer_files(vocab)
    if isinstance(made, str):
        return f"the GGUF's tokenizer cannot be converted ({made}); put the model's tokenizer.json beside it"
    (out_dir / "tokenizer.json").write_text(made[0])
    (out_dir / "tokenizer_config.json").write_text(made[1])
    return out_dir / "tokenizer.json"


def _stored_tasks(model, plan, group: int, layout: str, grid: str, moments, skip):
    """The experts to round, in order (by expert layer), with their Gram matrices from `moments`
    (all in RAM) if given; INT4 ones on `grid`."""
    for li, layer in enumerate(model.moe_layers):
        for ei, e in enumerate(layer.experts):
            if (li, ei) not in skip:
                g = moments.grams(li, ei) if moments is not None else (None,) * 3
                b = plan[li][ei]
                yield RoundingTask(li, ei, (e.w_gate, e.w_up, e.w_down), b, group, layout, g, grid_at(b, grid))


def _calibrated_tasks(trunk, tokens, plan, group: int, layout: str, grid: str, skip, progress):
    """The experts to round, in order (by expert layer), each with the Gram matrices of its inputs
    on the calibration tokens, computed layer by layer (layer_pass.py) as it is drawn and dropped
    once it is handed on: one expert's moments in RAM, not the model's. `trunk`: the model as the
    artifact computes it (compiled_trunk), experts still float; finished records (`skip`) are run,
    not rounded. INT4 experts on `grid`."""
    calibration = LayerPass(trunk, tokens)
    for layer in track(progress, calibration.layers(), "calibration: expert inputs",
                       total=trunk.config.num_moe_layers, unit="layer"):
        li = layer.moe_index
        for ei, stored in enumerate(layer.layer.experts):
            expert = read_stored(stored)
            routed = layer.expert_inputs(ei, expert)
            if (li, ei) not in skip:
                gate_up, down, _ = grams(routed, layer.ffn_in, trunk.expert_act_group) if routed else (None, None, 0)
                b = plan[li][ei]
                yield RoundingTask(li, ei, (stored.w_gate, stored.w_up, stored.w_down), b, group, layout,
                                   (gate_up, gate_up, down), grid_at(b, grid))
            layer.add(ei, expert, routed)


def _compile_into(model_dir: Path, out_dir: Path, opts: CompileOptions, target, cc: str | None, log, progress,
                  inputs: bytes) -> dict:
    t0 = time.time()
    if opts.trunk_bits != "auto":
        check_trunk_bits(opts.trunk_bits)
    search = opts.tolerance is not None or opts.max_bits is not None
    check_rounding(opts, search)
    expert_order = resolved_expert_order(opts)
    described = describe_model(model_dir)
    check_kv_cache(described, opts.kv_cache)
    method = sensitivity_method(described, opts.sensitivity) if search else None
    if opts.dask_scheduler:
        from .dask_pool import DaskPool

        pool = DaskPool(opts.dask_scheduler)  # fails here, before the long stages, if Dask is not installed
    with stage(progress, f"importing {model_dir.name}"):
        # every tensor stays in the checkpoint until used: experts rounded one at a time, the trunk read
        # a layer at a time by the calibration pass and a matrix at a time into trunk.bin; a search by
        # measured sensitivity keeps the model in RAM. Dask workers read experts by their file address,
        # from their own working directory: absolute
        model = load_model(model_dir.absolute() if opts.dask_scheduler else model_dir, lazy=method != "measured")
    cfg = model.config
    jobs = opts.jobs or default_jobs(model.parameter_counts()["experts"], calibrated=opts.calibration is not None)
    if not opts.dask_scheduler:
        pool = ExpertPool(jobs)
    if opts.trunk_bits == "auto":
        opts = replace(opts, trunk_bits=trunk_bits(model, opts))
        check_rounding(opts, search)
        if opts.trunk_bits == 4:
            log("trunk matrices at INT4: the checkpoint stores every one of them in at most 4.5 bits per weight")
    if opts.rounding == "llamacpp":
        model = llamacpp_rounded(model, expert_bit_plan(cfg, opts), opts.trunk_bits, opts.group)
    tokenizer = place_tokenizer(model_dir, out_dir)  # the artifact's tokenizer.json, or why there is none
    calib_tokens = rounding_tokens = None
    if cfg.encoder_layers and (opts.calibration is not None or opts.search_text is not None or
                               opts.tolerance is not None or opts.max_bits is not None):
        raise ValueError(f"{cfg.arch} is an encoder-decoder model: calibration, routing profiles and bit-plan "
                         "searches are implemented for decoder-only models; compile it without --calibration, "
                         "--tolerance and --max-bits (an explicit bit plan works)")
    if (opts.calibration is not None or opts.search_text is not None) and isinstance(tokenizer, str):
        raise ValueError(f"calibration and search text need the model's tokenizer, and {model_dir} has none: "
                         f"{tokenizer}")
    if opts.calibration is not None:
        calib_tokens = rounding_tokens = tokenize_file(tokenizer, opts.calibration, opts.calibration_tokens)
    searched = moments = rounded_trunk = None
    grid = int4_grid(model, opts)
    if search and calib_tokens is None:
        raise ValueError("--tolerance and --max-bits need calibration text (--calibration) to measure expert "
                         "sensitivity on")
    if calib_tokens is not None:
        fit = calib_tokens
        if search:
            text = None if opts.search_text is None else \
                tokenize_file(tokenizer, opts.search_text, opts.calibration_tokens)
            fit, search_tokens, check_tokens = split_tokens(calib_tokens, text)
        search_layout = weight_layout(cfg, target, opts, list(LEVELS))
        with stage(progress, "rounding the trunk"):
            rounded_trunk = compiled_trunk(model, opts.trunk_bits, opts.group, search_layout, grid)
    if search:
        goals = ([f"within {100 * opts.tolerance:.2f}% perplexity loss"] if opts.tolerance is not None else []) + \
            ([f"at most {opts.max_bits} bits on average"] if opts.max_bits is not None else [])
        log(f"searching a bit plan {' and '.join(goals)} by {method} sensitivity ({len(search_tokens)} search "
            f"tokens, {len(check_tokens)} check tokens of {opts.search_text or opts.calibration})")
        if method == "measured":  # the search and the rounding read every expert's moments, all in RAM
            moments = expert_moments(rounded_trunk, fit, progress=progress)
            rounded_trunk = None
            log(f"measured expert inputs on {len(fit)} calibration tokens (the quantizer rounds against them)")
        else:  # streamed: the compile rounds against the same fit tokens, as it goes
            rounding_tokens = fit  # the check tokens stay unseen by the rounding too
        found = out_dir / ".bit_plan_search.json"  # kept by an interrupted compile: the search is not redone
        t_search = time.time()
        if found.is_file():
            searched = BitPlan.from_dict(json.loads(found.read_text()))
            log(f"resuming: the bit plan searched before ({searched.average_bits:.2f} bits)")
        elif method == "estimated":
            with ExpertPool(jobs) as local:
                searched = search_plan_estimated(model, rounded_trunk, fit, search_tokens, check_tokens,
                                                 opts.tolerance, opts.max_bits, opts.group, local, log, progress,
                                                 grid)
        else:
            searched = search_plan(model, search_tokens, check_tokens, opts.tolerance, opts.group,
                                   cache_dir(), log=log, trunk_bits=opts.trunk_bits, layout=search_layout,
                                   moments=moments, max_bits=opts.max_bits, progress=progress, int4_grid=grid)
        found.write_text(json.dumps(searched.to_dict()))
        log(f"bit plan: {searched.average_bits:.2f} bits on average, searched in {time.time() - t_search:.0f} s; "
            f"peak RSS {peak_rss() / 2**30:.2f} GiB")
        if opts.tolerance is not None and searched.check_loss > opts.tolerance:
            log(f"warning: the plan loses {100 * searched.check_loss:.2f}% on check tokens, over the tolerance by "
                f"{100 * (searched.check_loss - opts.tolerance):.2f} points")
        opts = replace(opts, bit_plan=searched.plan)
    plan = expert_bit_plan(cfg, opts)
    bits_used = sorted({b for row in plan for b in row})
    layout = weight_layout(cfg, target, opts, bits_used)
    max_seq = min(opts.max_seq or min(cfg.max_positions, 2048), cfg.max_positions)
    counts = model.parameter_counts()
    log(f"imported {model_dir}: {cfg.arch}, {cfg.num_layers} layers, {cfg.num_moe_layers} of them with "
        f"{cfg.num_experts} experts (top-{cfg.top_k}), "
        f"{counts['total'] / 1e6:.2f}M parameters, {100 * counts['experts'] / counts['total']:.1f}% in experts")

    profile = None
    if calib_tokens is not None:  # before the image: its layout follows the routing
        profile = profile_routing(model, calib_tokens, progress=progress)
        log(f"profiled expert routing on {len(calib_tokens)} calibration tokens from {opts.calibration}")
    order = profile.coactivation_order() if expert_order == "coactivation" else None
    writer = ImageWriter(out_dir / "experts.bin", plan, cfg.hidden_size, cfg.expert_intermediate, opts.group, layout,
                         out_dir / ".experts.bin.journal", inputs, cfg.expert_activation, grid, order)
    if writer.done:
        log(f"resuming: {len(writer.done)} of {writer.n} expert records kept from the interrupted compile")
    skip = set(writer.done)
    tasks = _stored_tasks(model, plan, opts.group, layout, grid, moments, skip) if rounded_trunk is None else \
        _calibrated_tasks(rounded_trunk, rounding_tokens, plan, opts.group, layout, grid, skip, progress)
    t_round, cpu_round = time.time(), cpu_seconds()
    with pool:
        for r in track(progress, pool.run(tasks), "rounding experts", total=writer.n - len(skip), unit="expert"):
            writer.write(r.layer, r.expert, r.bits, r.payload, r.part_offsets)
    rounded = (writer.n - len(skip)) / max(writer.n, 1) * counts["experts"]
    seconds, cpu = time.time() - t_round, cpu_seconds() - cpu_round
    log(f"rounded {writer.n - len(skip)} experts ({rounded / 1e6:.1f}M parameters"
        f"{', against their calibration inputs' if rounded_trunk is not None else ''}) on {pool.where} in "
        f"{seconds:.1f} s ({cpu:.1f} CPU-seconds{'' if isinstance(pool, ExpertPool) else ' in this process'}): "
        f"{rounded / 1e6 / max(seconds, 1e-9):.3g}M parameters/s; peak RSS {peak_rss() / 2**30:.2f} GiB")
    if rounded_trunk is not None:
        log(f"measured expert inputs on {len(rounding_tokens)} calibration tokens (the quantizer rounds against them)")
    rounded_trunk = None
    # kernels before the weights: trunk.bin records their digest, machine and CPU features
    store = TuningStore(target, opts.tuning_dir)
    weight_bytes = sum(counts[part] * bits // 8 for part, bits in (("experts", max(bits_used)), ("trunk", opts.trunk_bits)))
    kernels = build_kernels(cfg, bits_used, opts.trunk_bits, layout, opts.group, target, out_dir, store, opts.tune,
                            progress, cc, weight_bytes, grid, opts.kv_cache)
    sources = [v["from"] for v in kernels["schedules"].values()]
    log(f"lowered {len(kernels['symbols'])} kernels through TVM for {target.name} ({kernels['tvm_target']}); "
        f"schedules: {sources.count('tuning record')} from tuning records, {sources.count('tuned now')} tuned now, "
        f"{sources.count('default')} default")
    tvm_target = target.tvm()
    identity = ArtifactIdentity(
        compile_id=os.urandom(16),
        # what the runtime checks before running them: kernels.so, or the firmware's kernels.o
        kernels_sha256=bytes.fromhex(_sha256(out_dir / kernels.get("library", kernels["object"]))),
        machine=elf_machine(tvm_target), cpu_features=required_features(tvm_target))
    with stage(progress, "writing experts.bin and trunk.bin"):
        records = writer.finish(identity.compile_id)
        trunk_bytes = write_trunk(out_dir / "trunk.bin", model, max_seq, opts.trunk_bits, opts.group, layout,
                                  profile, identity, grid, opts.kv_cache)
    average_bits = float(np.mean(plan))
    grid_note = "; INT4 on the integer grid −8…7 (Q4_0's)" if grid == "integer" and 4 in bits_used + [opts.trunk_bits] \
        else ""
    log(f"wrote experts.bin ({len(records)} records, INT{'/'.join(map(str, bits_used))}, {average_bits:.2f} bits "
        f"on average, group {opts.group}) and trunk.bin ({trunk_bytes / 2**20:.2f} MiB, matrices "
        f"{'float32' if opts.trunk_bits == 32 else f'INT{opts.trunk_bits}'}); {layout} layout, "
        f"{'integer-dot' if layout == 'tiles' else 'float-dequantizing'} kernels{grid_note}"
        f"{'; rounded as llama.cpp rounds (Q8_0 / Q4_0 blocks)' if opts.rounding == 'llamacpp' else ''}")

    board = None
    if target.board is not None:  # a microcontroller: flash image, firmware sources, and does it fit
        from .firmware import check_fits, write_firmware_files, write_flash_image

        with stage(progress, "writing flash.bin and the firmware's kernel table"):
            image_bytes = write_flash_image(out_dir, out_dir / "flash.bin")
            board = check_fits(target, out_dir, cfg, max_seq, image_bytes, opts.kv_cache)
            write_firmware_files(target, out_dir, kernels["symbols"])
        log(f"wrote flash.bin ({image_bytes / 2**20:.2f} MiB of {board['flash_bytes'] / 2**20:.0f} MiB flash, at "
            f"0x{target.board['flash']['address']:08x}); the minimum session ({board['minimum_budget_bytes'] / 2**20:.2f}"
            f" MiB) fits {board['session_ram_bytes'] / 2**20:.2f} MiB of RAM")

    # the C runtime's own tokenizer, where it can reproduce this one (text in and out without Python)
    tokenizer_c = tokenizer if isinstance(tokenizer, str) else write_tokenizer(tokenizer, out_dir / "tokenizer.bin")

    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(out_dir.iterdir()) if p.is_file() and p.name != "manifest.json" and p.name[0] != "."}
    manifest = {
        "format": "edgemoe-artifact",
        "version": MANIFEST_VERSION,
        "model": {"source": str(model_dir), "config": cfg.to_dict(), "parameters": counts},
        "target": target.name,
        "compile_id": identity.compile_id.hex(),
        "tokenizer": {"c_runtime": tokenizer_c is None, "why_not": tokenizer_c},
        "cpu_features": feature_names(identity.cpu_features),
        "max_seq": max_seq,
        "kv_cache": opts.kv_cache,
        "quantization": {"scheme": "symmetric group-wise, fp16 scales (docs/FORMAT.md)", "group": opts.group,
                         "rounding": "llama.cpp's Q8_0 / Q4_0 blocks" if opts.rounding == "llamacpp" else
                         "calibrated (GPTQ)" if calib_tokens is not None else "searched scales",
                         "rule": opts.rounding,
                         "expert_bits": bits_used[0] if len(bits_used) == 1 else None,
                         "average_bits": average_bits, "bit_plan": plan, "trunk_bits": opts.trunk_bits,
                         "layout": layout, "int4_grid": grid},
        "experts": {"records": len(records), "record_bytes": max(r.length for r in records),
                    "image_bytes": files["experts.bin"]["bytes"], "rounded_on": pool.where, "order": expert_order},
        "trunk_bytes": trunk_bytes,
        "bit_plan_search": None if searched is None else {
            **searched.to_dict(), "text": str(opts.search_text or opts.calibration), "sensitivity": method},
        "profile": None if profile is None else {
            "calibration": str(opts.calibration), "tokens": int(profile.selected.shape[0]),
            "expert_frequency": profile.frequency.round(4).tolist()},
        "kernels": kernels,
        "board": board,
        "files": files,
        "compile_seconds": round(time.time() - t0, 2),
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
