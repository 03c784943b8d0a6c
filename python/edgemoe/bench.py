"""edgemoe-bench: side-by-side measurements in one run (docs/BENCHMARKS.md records what it printed)."""
from __future__ import annotations

import json
import os
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import click

from .cli import MAX_THREADS, UINT32_MAX, _Bytes, _Finite, _NumberList, _token_ids
from .units import fmt_bytes


@dataclass
class RunConfig:
    name: str
    budget_fraction: float | None  # expert cache as a fraction of all experts; None = all resident
    predictor: str = "none"
    eviction: str = "lru"
    loader_thread: bool = True
    warm: bool = False  # run the workload once first, so every expert it needs is resident (IO-FREE)
    budget: int | None = None  # bytes; overrides budget_fraction
    threads: int = 1  # compute threads for the kernels' parallel loops
    readers: int = 1  # expert reads in flight at once (reader threads)
    prefetch_margin: float = 0.0  # > 0: a confidence-driven number of experts to prefetch (Session's)
    prefetch_layers: int = 1  # layers with experts a hidden-state predictor prefetches ahead (Session's)
    preload: bool = False  # fill the expert cache at open with the most often chosen experts (Session's)
    # the prompt token by token, as decoding runs: the bounds on a routing trace (Belady's MIN) replay
    # it in that order (Session's; `edgemoe-bench prefill` measures prompts run a batch at a time)
    prefill_tokens: int = 1


def pipeline_configs(fraction: float, queue_depth: int = 1, margin: float = 0.0) -> list[RunConfig]:
    """IO-FREE, IO-EXP and EdgeMoE with each technique switchable (design brief §6); where the
    storage overlaps requests (queue_depth > 1), the last configuration again with several reads in
    flight; with a prefetch `margin`, the fitted-router one again naming a confidence-driven number."""
    readers = min(queue_depth, 4)
    extra = [RunConfig(f"cache {fraction:.0%}, EdgeMoE eviction, fitted-router prefetch, {readers} reads in flight",
                       fraction, predictor="fitted-router", eviction="edgemoe", readers=readers)] if readers > 1 else []
    if margin:
        extra.append(RunConfig(f"cache {fraction:.0%}, EdgeMoE eviction, fitted-router prefetch, margin {margin:g}"
                               + (f", {readers} reads in flight" if readers > 1 else ""), fraction,
                               predictor="fitted-router", eviction="edgemoe", readers=readers,
                               prefetch_margin=margin))
    return [
        RunConfig("IO-FREE (all experts resident)", None, warm=True),
        RunConfig("IO-EXP (on demand, no cache reuse, no prediction)", 0.0, loader_thread=False),
        RunConfig(f"cache {fraction:.0%}, LRU, no prediction", fraction, loader_thread=False),
        RunConfig(f"cache {fraction:.0%}, EdgeMoE eviction, no prediction", fraction, eviction="edgemoe",
                  loader_thread=False),
        RunConfig(f"cache {fraction:.0%}, LRU, path-table prefetch", fraction, predictor="path-table"),
        RunConfig(f"cache {fraction:.0%}, LRU, next-router prefetch", fraction, predictor="next-router"),
        RunConfig(f"cache {fraction:.0%}, EdgeMoE eviction, next-router prefetch", fraction, predictor="next-router",
                  eviction="edgemoe"),
        RunConfig(f"cache {fraction:.0%}, EdgeMoE eviction, path-table prefetch", fraction, predictor="path-table",
                  eviction="edgemoe"),
        RunConfig(f"cache {fraction:.0%}, EdgeMoE eviction, fitted-router prefetch", fraction,
                  predictor="fitted-router", eviction="edgemoe"),
    ] + extra


def run_config(artifact: Path, cfg: RunConfig, prompt: list[int], n_new: int, emulate, max_seq: int,
               trace: bool = False, compute=None) -> dict:
    """Greedy-decodes n_new tokens after the prompt; per-token decode times and the runtime's counters
    (with `trace`, also "trace": the experts each layer selected, [tokens, layers, top_k])."""
    from .runtime import Session, budget_bytes

    if cfg.budget is not None:
        budget = cfg.budget
    else:
        budget = 0 if cfg.budget_fraction is None else budget_bytes(artifact, max_seq, cfg.budget_fraction)
    with Session(artifact, memory_budget=budget, max_seq=max_seq,
                 emulate=emulate, loader_thread=cfg.loader_thread, predictor=cfg.predictor,
                 eviction=cfg.eviction, threads=cfg.threads, readers=cfg.readers, emulate_compute=compute,
                 prefetch_margin=cfg.prefetch_margin, prefetch_layers=cfg.prefetch_layers,
                 preload=cfg.preload, prefill_tokens=cfg.prefill_tokens) as s:
        if cfg.warm:
            s.generate(prompt, n_new)
            s.reset()
        before = s.stats()
        if trace:
            s.trace_routing(len(prompt) + n_new)
        logits = s.prefill(prompt)
        after_prompt = s.stats()
        times, tokens = [], []
        for _ in range(n_new):
            tokens.append(int(logits.argmax()))
            t0 = time.perf_counter()
            logits = s.decode_step(tokens[-1])
            times.append(time.perf_counter() - t0)
        st = s.stats()
        routing = s.routing_trace() if trace else None
    d = {k: st[k] - before[k] for k in st if k not in ("memory_bytes", "trunk_bytes", "expert_cache_bytes",
                                                       "cache_slots", "record_bytes")}
    d.update({k: st[k] for k in ("memory_bytes", "cache_slots", "record_bytes")})
    n = max(d["tokens"], 1)
    uses = d["expert_hits"] + d["expert_misses"]
    return {
        "config": cfg.name, "tokens": tokens, "ms_per_token": 1e3 * statistics.median(times),
        "hit_rate": d["expert_hits"] / max(uses, 1),
        "prediction_rate": d["predicted_hits"] / d["predicted"] if d["predicted"] else None,
        "bytes_read_per_token": d["bytes_read"] / n, "stall_ms_per_token": d["stall_ns"] / 1e6 / n,
        "compute_ms_per_token": d["compute_ns"] / 1e6 / n, "prefetch_used": d["prefetch_used"],
        "prefetch_wasted": d["prefetch_wasted"], "prefetch_issued": d["prefetch_issued"],
        "prefetch_declined": d["prefetch_declined"],
        "memory_bytes": d["memory_bytes"], "cache_slots": d["cache_slots"], "record_bytes": d["record_bytes"],
        "reads_per_token": d["records_read"] / n,
        # the generated tokens only (ms_per_token's steps), with the cache as the prompt left it
        "mean_ms_per_token": 1e3 * statistics.mean(times),
        "decode_reads_per_token": (st["records_read"] - after_prompt["records_read"]) / n_new,
        "decode_bytes_per_token": (st["bytes_read"] - after_prompt["bytes_read"]) / n_new,
        "decode_requests_per_token": (st["read_requests"] - after_prompt["read_requests"]) / n_new,
        **({"trace": routing} if trace else {}),
    }


# What a configuration needs from the artifact's routing profile (compiled with --calibration).
PROFILE_PREDICTORS = ("path-table", "fitted-router")
PROFILE_EVICTIONS = ("edgemoe",)


def needs_profile(cfg: RunConfig) -> bool:
    return cfg.predictor in PROFILE_PREDICTORS or cfg.eviction in PROFILE_EVICTIONS


def read_manifest(artifact: Path) -> dict:
    path = artifact / "manifest.json"
    if not path.is_file():
        raise click.ClickException(f"{path} not found: {artifact} is not a compiled artifact (edgemoe-compile "
                                   f"writes manifest.json last; a failed compile leaves none)")
    return json.loads(path.read_text())


def batched_kernels(artifact: Path) -> bool:
    """Whether the artifact's kernels include batched forms (a prompt's batches run BATCH_ROWS tokens per
    call of the experts' and, with a quantized trunk, the attention projections' and resident MLPs')."""
    from .compiler.program import BATCH_ROWS, BATCH_SUFFIX

    suffix = BATCH_SUFFIX.format(batch=BATCH_ROWS)
    return any(s.endswith(suffix) for s in read_manifest(artifact)["kernels"]["symbols"])


def prompt_ids(artifact: Path, prompt: str, tokens: str | None) -> list[int]:
    """--tokens as given, else --prompt through the artifact's tokenizer.json (a clear error where
    the artifact has none)."""
    if tokens is not None:
        return _token_ids(tokens)
    path = artifact / "tokenizer.json"
    if not path.is_file():
        raise click.ClickException(f"{path} not found (the model directory it was compiled from had no tokenizer): "
                                   f"give the prompt as token ids with --tokens, e.g. --tokens 1,2,3")
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(path)).encode(prompt).ids
    if not ids:
        raise click.UsageError("the prompt encodes to no tokens")
    return ids


def check_context(ids: list[int], n_new: int, max_seq: int, manifest: dict, artifact: Path) -> None:
    """The prompt and the new tokens fit --max-seq, which fits the artifact."""
    if max_seq > manifest["max_seq"]:
        raise click.BadParameter(f"{max_seq} is more than {artifact}'s maximum context {manifest['max_seq']}",
                                 param_hint="--max-seq")
    if len(ids) + n_new > max_seq:
        raise click.BadParameter(f"{len(ids)} prompt tokens + {n_new} new tokens need {len(ids) + n_new} positions "
                                 f"but --max-seq is {max_seq}: give -n 1..{max(max_seq - len(ids), 1)} or raise "
                                 f"--max-seq", param_hint="-n")


def _queue_depth(storage: str) -> int:
    """Requests the emulated device overlaps: its target's queue depth (1 for MBPS,MS)."""
    from .targets import load_target

    return 1 if "," in storage else int(load_target(storage).storage.get("queue_depth") or 1)


def board_option(f):
    """--emulate-compute for the benchmarks that emulate a board's storage."""
    return click.option("--emulate-compute", "compute_spec", default="board", show_default=True,
                        metavar="board|TARGET|GBPS,GOPS,GFLOPS|none",
                        help="Pace every kernel to a board's compute (runtime_c/src/pacer.h): board = the "
                             "--emulate-storage target's own figures (none where it is MBPS,MS or has none); "
                             "none = this machine's speed.")(f)


def board_emulation(storage: str, compute_spec: str):
    """(storage emulation, compute emulation or None, a line saying what is emulated) for --emulate-storage
    and --emulate-compute."""
    from .cli import _compute_emulation, _storage_emulation
    from .targets import load_target

    emulate = _storage_emulation(storage)
    if compute_spec == "board":
        compute = None if "," in storage else load_target(storage).compute_emulation()
    else:
        compute = _compute_emulation(compute_spec)
    where = f"storage {storage} ({emulate[0] / 1e6:.0f} MB/s, {emulate[1] * 1e3:.2f} ms)"
    if compute is None:
        return emulate, None, f"{where}, this machine's compute"
    return emulate, compute, (f"emulated board: {where}, compute {compute[0] / 1e9:.2f} GB/s, "
                              f"{compute[1] / 1e9:.0f} G int8 op/s, {compute[2] / 1e9:.0f} GFLOP/s")


def floor_ms(result: dict, free_ms: float, bandwidth: float | None) -> float:
    """The decode-time floor: the larger of all-resident compute time and the reads it must do ÷ bandwidth."""
    io = result["bytes_read_per_token"] / bandwidth * 1e3 if bandwidth else 0.0
    return max(free_ms, io)


def plot_option(name: str):
    """--plot PATH / --no-plot: every subcommand draws its table into a PNG (plots.py)."""
    def decorate(f):
        f = click.option("--no-plot", is_flag=True, help="Write no chart (as --plot '').")(f)
        return click.option("--plot", "plot_path", default=f"edgemoe-bench-{name}.png", show_default=True,
                            metavar="PATH", help="PNG chart of the table to write; '' for none.")(f)
    return decorate


def write_plot(plot_path: str, no_plot: bool, chart: str, *args, **kwargs) -> Path | None:
    """Draws `chart` (a function of plots.py) into plot_path unless the user asked for none; says so on stderr."""
    if no_plot or not plot_path:
        return None
    try:
        from . import plots
    except ImportError as e:
        raise click.ClickException(f"cannot draw {plot_path}: {e} (pip install matplotlib, or pass --no-plot)")
    path = getattr(plots, chart)(Path(plot_path), *args, **kwargs)
    click.echo(f"wrote {path}", err=True)
    return path


@click.group("edgemoe-bench")
def bench_cmd():
    """Benchmarks of the compiled model in the C runtime; each writes its table as a PNG too (--plot)."""


@bench_cmd.command("pipeline")
@click.argument("artifact", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--prompt", default="The history of the city begins in", show_default=True)
@click.option("--tokens", default=None, help="Comma-separated prompt token ids instead of --prompt (for an artifact "
                                             "without tokenizer.json).")
@click.option("-n", "n_new", type=click.IntRange(1, UINT32_MAX), default=64, show_default=True)
@click.option("--fraction", type=_Finite(0, 1), default=0.25, show_default=True,
              help="Expert cache as a fraction of all experts.")
@click.option("--emulate-storage", "storage", default="rpi4", show_default=True, metavar="TARGET|MBPS,MS")
@click.option("--max-seq", type=click.IntRange(1, UINT32_MAX), default=256, show_default=True)
@click.option("--prefetch-margin", type=_Finite(0, 100, min_open=True), default=None,
              help="Also run the fitted-router configuration prefetching a confidence-driven number of experts "
                   "(the top-k and those within this many logits of the k-th, at most 2 · top-k).")
@board_option
@click.option("--json-out", type=click.Path(dir_okay=False, path_type=Path), default=None)
@plot_option("pipeline")
def pipeline_cmd(artifact, prompt, tokens, n_new, fraction, storage, max_seq, prefetch_margin, compute_spec, json_out,
                 plot_path, no_plot):
    """IO-FREE vs IO-EXP vs EdgeMoE expert management, side by side on emulated storage. On an artifact
    compiled without calibration text the configurations that need its routing profile (path-table and
    fitted-router prediction, EdgeMoE eviction) are skipped, with a note."""
    emulate, compute, where = board_emulation(storage, compute_spec)
    manifest = read_manifest(artifact)
    ids = prompt_ids(artifact, prompt, tokens)
    check_context(ids, n_new, max_seq, manifest, artifact)
    configs = pipeline_configs(fraction, _queue_depth(storage), prefetch_margin or 0.0)
    skipped = [] if manifest.get("profile") else [c for c in configs if needs_profile(c)]
    results = []
    with click.progressbar([c for c in configs if c not in skipped], label="configurations", file=sys.stderr,
                           item_show_func=lambda c: c.name if c else "") as bar:
        for cfg in bar:
            results.append(run_config(artifact, cfg, ids, n_new, emulate, max_seq, compute=compute))
    free = results[0]["ms_per_token"]
    same = all(r["tokens"] == results[0]["tokens"] for r in results)
    click.echo(f"artifact {artifact} ({manifest['quantization']['average_bits']:.2f} expert bits on average, "
               f"largest record {fmt_bytes(manifest['experts']['record_bytes'])}), {where}, {n_new} tokens, "
               f"identical tokens in every configuration: {same}")
    click.echo("| configuration | ms/token | × IO-FREE | floor ms | × floor | cache hit | prediction | read/token "
               "| stall ms/token | slots |")
    click.echo("|---|---|---|---|---|---|---|---|---|---|")
    chart = []
    for r in results:
        fl = floor_ms(r, free, emulate[0])
        chart.append({"config": r["config"], "ms_per_token": r["ms_per_token"], "floor_ms": fl})
        pred = f"{r['prediction_rate']:.1%}" if r["prediction_rate"] is not None else "-"
        click.echo(f"| {r['config']} | {r['ms_per_token']:.2f} | {r['ms_per_token'] / free:.2f} | {fl:.2f} | "
                   f"{r['ms_per_token'] / fl:.2f} | {r['hit_rate']:.1%} | {pred} | "
                   f"{fmt_bytes(r['bytes_read_per_token'])} | {r['stall_ms_per_token']:.2f} | {r['cache_slots']} |")
    if json_out:
        json_out.write_text(json.dumps({"storage": storage, "emulate": emulate, "compute": compute, "results": results,
                                        "skipped": [c.name for c in skipped]}, indent=1))
    if skipped:
        click.echo(f"note: {artifact} was compiled without calibration text (no routing profile): skipped "
                   f"{len(skipped)} configurations that need one (path-table or fitted-router prediction, EdgeMoE "
                   f"eviction): {'; '.join(c.name for c in skipped)}. Compile with --calibration TEXT to run them.")
    write_plot(plot_path, no_plot, "pipeline", chart,
               title=f"{artifact}: ms/token, {where}, {n_new} tokens")


def sweep_configs(fraction: float, profile: bool, readers: int = 1, ahead: int = 1) -> list[RunConfig]:
    """The cache policies a sweep compares at one budget (without a routing profile: LRU and
    next-router prediction only). Each reads a layer's misses together on `readers` reader threads
    (the storage's queue depth, at most the runtime's 16). With `ahead` > 1, the prediction row again
    prefetching that many layers ahead."""
    common = dict(predictor="none", readers=readers)
    configs = [RunConfig("LRU", fraction, eviction="lru", **common)]
    name, predicted = ("EdgeMoE + prediction", dict(predictor="fitted-router", eviction="edgemoe")) if profile else \
        ("LRU + prediction", dict(predictor="next-router", eviction="lru"))
    if profile:
        configs.append(RunConfig("EdgeMoE eviction", fraction, eviction="edgemoe", **common))
    configs.append(RunConfig(name, fraction, readers=readers, **predicted))
    if ahead > 1:
        configs.append(RunConfig(f"{name}, {ahead} layers ahead", fraction, readers=readers, prefetch_layers=ahead,
                                 **predicted))
    return configs


@bench_cmd.command("sweep")
@click.argument("artifact", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--float-artifact", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="The same model compiled with --bits 16: its on-demand row is IO-EXP (float experts, as the "
                   "EdgeMoE paper defines it).")
@click.option("--fractions", type=_NumberList(float, 0, 1, lo_open=True), default="0.05,0.1,0.25,0.5,0.75,1",
              show_default=True, help="Expert cache sizes, as fractions of all experts.")
@click.option("--prompt", default="The history of the city begins in", show_default=True)
@click.option("--tokens", default=None, help="Comma-separated prompt token ids instead of --prompt.")
@click.option("-n", "n_new", type=click.IntRange(1, UINT32_MAX), default=64, show_default=True)
@click.option("--emulate-storage", "storage", default="rpi4", show_default=True, metavar="TARGET|MBPS,MS")
@click.option("--max-seq", type=click.IntRange(1, UINT32_MAX), default=256, show_default=True)
@click.option("--prefetch-layers", type=click.IntRange(1, 4), default=1, show_default=True,
              help="With more than 1, the prediction row again, prefetching that many layers with experts ahead.")
@click.option("--preload", is_flag=True,
              help="Every cached configuration fills its cache at open with the most often chosen experts (the "
                   "reads happen before the prompt; per-token figures count the decode alone).")
@click.option("--repeat", type=click.IntRange(1, 100), default=1, show_default=True,
              help="Runs of each configuration; the one with the least mean time per token is reported (on a "
                   "shared machine, the least disturbed).")
@board_option
@click.option("--json-out", type=click.Path(dir_okay=False, path_type=Path), default=None)
@plot_option("sweep")
def sweep_cmd(artifact, float_artifact, fractions, prompt, tokens, n_new, storage, compute_spec, max_seq,
              prefetch_layers, preload, repeat, json_out, plot_path, no_plot):
    """Time and reads per token against the expert budget, each policy beside its bounds: Belady's MIN
    on the routing trace the run recorded (the fewest reads any cache of those slots could do) and the
    time a perfect pipeline would take for that policy's reads: max(compute, bytes ÷ bandwidth +
    requests × latency ÷ queue depth), a request being a run of adjacent records read at once. IO-FREE (all resident), IO-QEXP (the artifact's experts read on
    demand, no reuse) and, with --float-artifact, IO-EXP are the budget-independent rows."""
    from .cache_bound import belady_misses, time_bound_ms

    emulate, compute_figures, where = board_emulation(storage, compute_spec)
    bandwidth, latency, depth = emulate[0], emulate[1], _queue_depth(storage)
    manifest = read_manifest(artifact)
    ids = prompt_ids(artifact, prompt, tokens)
    check_context(ids, n_new, max_seq, manifest, artifact)
    fixed = [(artifact, RunConfig("IO-FREE", None, warm=True)),
             (artifact, RunConfig("IO-QEXP", 0.0, loader_thread=False))]
    if float_artifact is not None:
        check_context(ids, n_new, max_seq, read_manifest(float_artifact), float_artifact)
        fixed.append((float_artifact, RunConfig("IO-EXP", 0.0, loader_thread=False)))
    readers = min(depth, 16)
    runs = fixed + [(artifact, c) for f in fractions
                    for c in sweep_configs(f, bool(manifest.get("profile")), readers, prefetch_layers)]
    if preload:
        runs = [(path, replace(c, preload=c.budget_fraction not in (None, 0.0))) for path, c in runs]
    results = []
    with click.progressbar(runs, label="runs", file=sys.stderr, item_show_func=lambda r: r[1].name if r else "") as bar:
        for path, cfg in bar:
            tries = [run_config(path, cfg, ids, n_new, emulate, max_seq, trace=True, compute=compute_figures)
                     for _ in range(repeat)]
            r = min(tries, key=lambda run: run["mean_ms_per_token"])
            r["repeats_agree"] = all(t["tokens"] == r["tokens"] for t in tries)
            r["fraction"] = cfg.budget_fraction
            results.append(r)
    compute = results[0]["mean_ms_per_token"]
    # every run of one artifact decodes the same tokens (the float artifact's may differ from them)
    first: dict[Path, list[int]] = {}
    same = all(first.setdefault(path, r["tokens"]) == r["tokens"] and r["repeats_agree"]
               for (path, _), r in zip(runs, results))
    click.echo(f"artifact {artifact} ({manifest['quantization']['average_bits']:.2f} expert bits on average), "
               f"{where}, queue depth {depth} ({readers} reads in flight), "
               f"{len(ids)} prompt + {n_new} new tokens{', caches preloaded at open' if preload else ''}"
               f"{f', best of {repeat} runs' if repeat > 1 else ''}, "
               f"identical tokens in every run of an artifact: {same}")
    click.echo("| budget | configuration | slots | ms/token (mean) | bound ms | × bound | reads/token | Belady reads/token "
               "| × Belady | requests/token | read/token |")
    click.echo("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for r in results:
        cached = r["fraction"] not in (None, 0.0)
        reads, nbytes, ms = r["decode_reads_per_token"], r["decode_bytes_per_token"], r["mean_ms_per_token"]
        requests = r["decode_requests_per_token"]
        bound = time_bound_ms(compute, requests, nbytes, bandwidth, latency, depth)
        belady = belady_misses(r["trace"], r["cache_slots"], first_token=len(ids), prefilled=preload) / n_new \
            if cached else None
        budget = "all" if r["fraction"] is None else "on demand" if r["fraction"] == 0.0 else f"{r['fraction']:.0%}"
        ratio = f"{reads / belady:.2f}" if belady else "-"
        click.echo(f"| {budget} | {r['config']} | {r['cache_slots']} | {ms:.2f} | {bound:.2f} | {ms / bound:.2f} | "
                   f"{reads:.2f} | {f'{belady:.2f}' if belady is not None else '-'} | {ratio} | {requests:.2f} | "
                   f"{fmt_bytes(nbytes)} |")
        rows.append({"config": r["config"], "fraction": r["fraction"], "ms_per_token": ms, "bound_ms": bound,
                     "reads_per_token": reads, "requests_per_token": requests, "belady_reads_per_token": belady, "bytes_read_per_token": nbytes,
                     "cache_slots": r["cache_slots"]})
    if json_out:
        json_out.write_text(json.dumps({"storage": storage, "emulate": emulate, "compute": compute_figures,
                                        "queue_depth": depth, "rows": rows},
                                       indent=1))
    write_plot(plot_path, no_plot, "sweep", rows,
               title=f"{artifact.name}: {where}, {n_new} tokens")


@bench_cmd.command("prefill")
@click.argument("artifact", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--text", "text_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="The prompts: its first --prompt-tokens tokens, e.g. WikiText-2 test.")
@click.option("--prompt-tokens", "lengths", type=_NumberList(int, 1, UINT32_MAX), default="64,256", show_default=True,
              help="Comma-separated prompt lengths.")
@click.option("--fractions", type=_NumberList(float, 0, 1, lo_open=True), default="0.1,0.25,0.5,1", show_default=True,
              help="Comma-separated expert budgets (fractions of all experts; 1 = every expert, read on first use).")
@click.option("--batches", type=_NumberList(int, 1, 1024), default="1,16,64", show_default=True,
              help="Comma-separated prompt tokens run through each layer together (Session prefill_tokens); 1 = "
                   "token by token, the baseline.")
@click.option("--emulate-storage", "storage", default="phone-ufs31", show_default=True, metavar="TARGET|MBPS,MS")
@board_option
@click.option("--threads", type=click.IntRange(1, MAX_THREADS), default=1, show_default=True)
@click.option("--compare-kernels", is_flag=True,
              help="Run each batch of at least 4 tokens (BATCH_ROWS) a second time with one token per kernel call "
                   "(Session batched_kernels=False) beside the batched kernels.")
@click.option("--repeat", type=click.IntRange(1, 100), default=1, show_default=True,
              help="Runs of each configuration; the fastest is reported.")
@click.option("--json-out", type=click.Path(dir_okay=False, path_type=Path), default=None)
@plot_option("prefill")
def prefill_cmd(artifact, text_path, lengths, fractions, batches, storage, compute_spec, threads, compare_kernels,
                repeat, json_out, plot_path, no_plot):
    """Time to read a prompt, from a cold expert cache, token by token against a batch of tokens at a
    time through each layer (an expert the batch's tokens chose read once for all of them), at each
    expert budget: time, expert records read and bytes, and whether the logits after the prompt are the
    same bits. Every batch size gets the same memory budget (the one that holds the fraction of experts
    at the runtime's default batch), so a larger batch's buffers take from the expert cache. Predictor
    and eviction are the artifact's defaults; --batches 1 is how decoding feeds tokens. The matrices
    take BATCH_ROWS of a batch's tokens per call where the artifact has batched kernels ("kernels":
    batched), else one token per call ("single")."""
    from .compiler.program import BATCH_ROWS
    from .runtime import EdgeMoEError, Session, budget_bytes

    emulate, compute, where = board_emulation(storage, compute_spec)
    manifest = read_manifest(artifact)
    max_seq = max(lengths)
    if max_seq > manifest["max_seq"]:
        raise click.BadParameter(f"{max_seq} tokens is more than {artifact}'s maximum context {manifest['max_seq']}",
                                 param_hint="--prompt-tokens")
    ids = held_out_ids(artifact, text_path, max_seq)
    if len(ids) < max_seq:
        raise click.BadParameter(f"{text_path} has {len(ids)} tokens, fewer than {max_seq}", param_hint="--text")
    batches = sorted(set(batches) | {1})
    click.echo(f"artifact {artifact} ({manifest['quantization']['average_bits']:.2f} expert bits on average), {where}, "
               f"{threads} thread{'s' if threads > 1 else ''}, prompts from {text_path.name}, cold cache, "
               f"{f'best of {repeat} runs' if repeat > 1 else 'one run each'}")
    batched = batched_kernels(artifact)
    click.echo("| prompt tokens | budget | tokens per batch | kernels | ms | ms/token | × token by token | records read | "
               "read | same logits |")
    click.echo("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for n in lengths:
        for fraction in fractions:
            budget = 0 if fraction == 1 else budget_bytes(artifact, max_seq, fraction)
            baseline = None
            # below BATCH_ROWS tokens, or without batched kernels in the artifact, one token per call
            modes = ("batched", "single") if compare_kernels else ("batched",)
            runs = [(b, k) for b in batches for k in (modes if b >= BATCH_ROWS and batched else ("single",))]
            for batch, kernels in runs:
                best = None
                try:
                    for _ in range(repeat):
                        with Session(artifact, memory_budget=budget, max_seq=max_seq, emulate=emulate,
                                     emulate_compute=compute, threads=threads, prefill_tokens=batch,
                                     batched_kernels=kernels == "batched") as s:
                            t0 = time.perf_counter()
                            logits = s.prefill(ids[:n])
                            ms = 1e3 * (time.perf_counter() - t0)
                            st = s.stats()
                        if best is None or ms < best[0]:
                            best = (ms, st, logits)
                except EdgeMoEError as e:  # the same budget for every batch size: a larger batch may not fit
                    if e.kind != "budget":
                        raise
                    click.echo(f"| {n} | {fraction:.0%} | {batch} | {kernels} | a batch this large does not fit the budget"
                               " | | | | | |")
                    continue
                ms, st, logits = best
                if baseline is None:
                    baseline = best
                same = bool((logits == baseline[2]).all())
                click.echo(f"| {n} | {fraction:.0%} | {batch} | {kernels} | {ms:.1f} | {ms / n:.2f} | {baseline[0] / ms:.2f} | "
                           f"{st['records_read']} | {fmt_bytes(st['bytes_read'])} | {same} |")
                rows.append({"prompt_tokens": n, "fraction": fraction, "batch": batch, "kernels": kernels, "ms": ms,
                             "records_read": st["records_read"], "bytes_read": st["bytes_read"], "same_logits": same})
    if json_out:
        json_out.write_text(json.dumps({"storage": storage, "emulate": emulate, "compute": compute, "rows": rows},
                                       indent=1))
    write_plot(plot_path, no_plot, "prefill", rows, title=f"{artifact.name}: {where}")


def held_out_text_options(f):
    """--text, --tokens, --window: the held-out text a bench decodes, in passes of --window tokens."""
    f = click.option("--window", type=click.IntRange(1, UINT32_MAX), default=256, show_default=True,
                     help="Context per pass (the KV cache is reset between; the expert cache is not).")(f)
    f = click.option("--tokens", "n_tokens", type=click.IntRange(min=1), default=1024, show_default=True)(f)
    return click.option("--text", "text_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                        required=True,
                        help="Held-out text (never used for training or calibration), e.g. WikiText-2 test.")(f)


@bench_cmd.command("predictors")
@click.argument("artifact", type=click.Path(exists=True, file_okay=False, path_type=Path))
@held_out_text_options
@click.option("--fraction", type=_Finite(0, 1), default=0.25, show_default=True,
              help="Expert cache as a fraction of all experts.")
@click.option("--prefetch", "prefetch_counts", type=_NumberList(int, 0, UINT32_MAX), default="0", show_default=True,
              help="Comma-separated experts to predict and prefetch per layer (0 = top-k).")
@click.option("--margins", type=_NumberList(float, 0, 100, lo_open=True, allow_empty=True), default="",
              help="Comma-separated prefetch margins (logits): rows where each router predictor names its top-k "
                   "and every expert within the margin of the k-th, at most 2 · top-k (Session prefetch_margin).")
@click.option("--prefetch-layers", type=click.IntRange(1, 4), default=1, show_default=True,
              help="Layers ahead the hidden-state predictors guess; above 1, a column for what the guesses "
                   "two or more layers ahead named.")
@plot_option("predictors")
def predictors_cmd(artifact, text_path, n_tokens, window, fraction, prefetch_counts, margins, prefetch_layers,
                   plot_path, no_plot):
    """Next-layer prediction hit rate of each predictor over held-out text."""
    from .runtime import Session, budget_bytes

    manifest = read_manifest(artifact)
    top_k = manifest["model"]["config"]["top_k"]
    experts = manifest["model"]["config"]["num_experts"]
    if window > manifest["max_seq"]:
        raise click.BadParameter(f"{window} is more than {artifact}'s maximum context {manifest['max_seq']}",
                                 param_hint="--window")
    if max(prefetch_counts) > experts:
        raise click.BadParameter(f"{max(prefetch_counts)} is more than the {experts} experts of a layer",
                                 param_hint="--prefetch")
    ids = held_out_ids(artifact, text_path, n_tokens)
    budget = budget_bytes(artifact, window, fraction)
    # "none" is the baseline: the same cache with demand reads only.
    names = ["next-router", "fitted-router", "path-table", "wrong"] if manifest.get("profile") else \
        ["next-router", "wrong"]
    runs = [("none", 0, 0.0)] + [(n, c or top_k, 0.0) for c in prefetch_counts for n in names] + \
        [(n, 2 * top_k, m) for m in margins for n in names if n != "wrong"]
    click.echo(f"{len(ids)} tokens of {text_path.name}, windows of {window}, cache {fraction:.0%} of experts; "
               f"each layer uses {top_k} experts")
    far = prefetch_layers > 1
    click.echo("| predictor | experts named per layer | experts predicted | "
               + ("predicted two or more layers ahead | " if far else "")
               + "prefetches used | prefetches wasted | cache hit |")
    click.echo("|---|---|---|---|---|---|" + ("---|" if far else ""))
    chart = []
    for name, count, margin in runs:
        with Session(artifact, memory_budget=budget, max_seq=window, predictor=name, prefetch_experts=count,
                     prefetch_margin=margin, prefetch_layers=prefetch_layers, prefill_tokens=1) as s:
            for i in range(0, len(ids), window):
                s.reset()
                s.prefill(ids[i : i + window])
            st = s.stats()
        predicted = f"{st['predicted_hits'] / st['predicted']:.1%}" if st["predicted"] else "–"
        hit = st["expert_hits"] / max(st["expert_hits"] + st["expert_misses"], 1)
        if margin:  # the mean number a prediction named
            named, count = f"{st['prefetch_named'] / max(st['predictions'], 1):.2f} (margin {margin:g}, ≤ {count})", \
                round(st["prefetch_named"] / max(st["predictions"], 1), 2)
        else:
            named = "–" if name == "none" else str(count)
        ahead = (f"{st['predicted_ahead_hits'] / st['predicted_ahead']:.1%} | " if st["predicted_ahead"] else "– | ") \
            if far else ""
        click.echo(f"| {name} | {named} | {predicted} | {ahead}{st['prefetch_used']} | {st['prefetch_wasted']} | "
                   f"{hit:.1%} |")
        chart.append({"predictor": name, "count": count,
                      "predicted": st["predicted_hits"] / st["predicted"] if st["predicted"] else None,
                      "hit_rate": hit})
    write_plot(plot_path, no_plot, "predictors", chart,
               title=f"{artifact.name}: {len(ids)} tokens of {text_path.name}, cache {fraction:.0%} of experts")


def held_out_ids(artifact: Path, text_path: Path, n_tokens: int) -> list[int]:
    """The first n_tokens of a text, tokenized with the artifact's tokenizer."""
    from tokenizers import Tokenizer

    if not (artifact / "tokenizer.json").is_file():
        raise click.ClickException(f"{artifact / 'tokenizer.json'} not found: the text must be tokenized with the "
                                   f"model's tokenizer; copy the model's tokenizer.json into {artifact}")
    tok = Tokenizer.from_file(str(artifact / "tokenizer.json"))
    return tok.encode(text_path.read_text(encoding="utf-8", errors="replace")[: n_tokens * 8]).ids[:n_tokens]


def _steps_ahead(steps: int, layers: int) -> str:
    tokens = f" ({steps // layers} token{'s' if steps > layers else ''})" if steps % layers == 0 else ""
    return f"{steps} layer step{'s' if steps > 1 else ''}{tokens}"


@bench_cmd.command("lookahead")
@click.argument("artifact", type=click.Path(exists=True, file_okay=False, path_type=Path))
@held_out_text_options
@click.option("--fractions", type=_NumberList(float, 0, 1, lo_open=True), default="0.25,0.5", show_default=True,
              help="Expert cache sizes, as fractions of all experts.")
@click.option("--horizons", type=_NumberList(int, 1, UINT32_MAX, allow_empty=True), default=None,
              help="Comma-separated layer steps of the future the replayed policies know exactly "
                   "[default: 1 (a perfect next-layer predictor), one token, four tokens].")
def lookahead_cmd(artifact, text_path, n_tokens, window, fractions, horizons):
    """How far the runtime's cache policies are from Belady's MIN, and how much exact knowledge of
    the future closes the gap: LRU and EdgeMoE eviction replayed (cache_bound.replay_misses: the
    runtime's decisions, checked against it) on the routing of held-out text, knowing nothing, then
    the next `horizon` layer steps; and EdgeMoE given the frequencies this very text routes with
    (hindsight: the best any frequency score could know)."""
    import numpy as np

    from .cache_bound import belady_misses, replay_misses
    from .compiler.profile import RoutingProfile
    from .compiler.program import PROFILE_TENSORS
    from .compiler.trunk_file import read_float_tensor
    from .runtime import Session, budget_bytes

    manifest = read_manifest(artifact)
    if window > manifest["max_seq"]:
        raise click.BadParameter(f"{window} is more than {artifact}'s maximum context {manifest['max_seq']}",
                                 param_hint="--window")
    ids = held_out_ids(artifact, text_path, n_tokens)
    traces = []
    with Session(artifact, max_seq=window) as s:  # every expert resident: the routing alone is wanted
        for i in range(0, len(ids), window):
            s.reset()
            s.trace_routing(len(ids[i : i + window]))
            s.prefill(ids[i : i + window])
            traces.append(s.routing_trace())
    trace = np.concatenate(traces)
    tokens, layers, _ = trace.shape
    policies = {"LRU": ("lru", None)}
    if manifest.get("profile"):
        policies["EdgeMoE eviction"] = ("edgemoe", read_float_tensor(artifact / "trunk.bin", PROFILE_TENSORS["frequency"]))
    else:
        click.echo(f"note: {artifact} has no routing profile (compile with --calibration TEXT): LRU only")
    hindsight = RoutingProfile(trace, manifest["model"]["config"]["num_experts"]).frequency
    horizons = horizons or [1, layers, 4 * layers]
    click.echo(f"{tokens} tokens of {text_path.name}, windows of {window}; {layers} layers with experts, a "
               f"layer step being one layer of one token")
    click.echo("| budget | slots | policy | knows ahead | reads/token | × Belady |")
    click.echo("|---|---|---|---|---|---|")
    for fraction in fractions:
        with Session(artifact, memory_budget=budget_bytes(artifact, window, fraction), max_seq=window) as s:
            slots = s.stats()["cache_slots"]
        floor = belady_misses(trace, slots)
        rows = [("Belady's MIN", "everything", floor)]
        for name, (policy, frequency) in policies.items():
            rows.append((name, "nothing", replay_misses(trace, slots, policy, frequency)))
            rows += [(name, _steps_ahead(h, layers), replay_misses(trace, slots, policy, frequency, horizon=h))
                     for h in horizons]
        if "EdgeMoE eviction" in policies:
            rows.append(("EdgeMoE eviction, hindsight frequency", "nothing", replay_misses(trace, slots, "edgemoe",
                                                                                           hindsight)))
        for name, ahead, misses in rows:
            click.echo(f"| {fraction:.0%} | {slots} | {name} | {ahead} | {misses / tokens:.2f} | "
                       f"{misses / max(floor, 1):.2f} |")


def copy_bandwidth(nbytes: int = 512 << 20, repeats: int = 5) -> float:
    """Best memcpy rate over a buffer far beyond the caches, counting bytes read plus written."""
    import numpy as np

    src = np.ones(nbytes, np.uint8)
    dst = np.empty_like(src)
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(repeats))
    return 2 * nbytes / best


def read_bandwidth(threads: int, nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Best rate at which `threads` threads read one buffer far beyond the caches, each its own slice
    (NumPy sums: SIMD loops that release the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    parts = np.array_split(np.ones(nbytes // 4, np.float32), threads)
    with ThreadPoolExecutor(threads) as pool:
        best = min(_timed(lambda: list(pool.map(np.sum, parts))) for _ in range(repeats))
    return nbytes / best


def artifact_read_per_token(art: Path) -> float:
    """Bytes a decode step of the artifact reads with every expert resident: the trunk's tensors but
    the embedding table (one row of it; all of it where it is also the LM head), the RoPE tables and
    the predictor's, and per layer with experts top-k records of that layer's mean payload."""
    from .compiler.expert_image import read_table
    from .compiler.program import PROFILE_TENSORS
    from .compiler.trunk_file import tensor_sizes

    sizes = tensor_sizes(art / "trunk.bin")
    skip = {"program", "rope_cos", "rope_sin", *PROFILE_TENSORS.values()}
    if "lm_head" in sizes:  # else the embedding is the LM head too
        skip |= {"embed", "embed.scales"}
    trunk = sum(n for name, n in sizes.items() if name not in skip and "position_bias" not in name)
    head, records = read_table(art / "experts.bin")
    top_k = read_manifest(art)["model"]["config"]["top_k"]
    payload = [[] for _ in range(head.num_layers)]
    for r in records:
        payload[r.layer].append(r.payload_bytes)
    return trunk + sum(top_k * sum(p) / len(p) for p in payload)


def gguf_read_per_token(gguf: Path, top_k: int, experts: int) -> float:
    """The same for llama.cpp on a GGUF: every tensor but token_embd (unless it is also the output
    matrix), the routed experts' stacked tensors at top_k / experts of their bytes."""
    from gguf import GGUFReader

    tensors = GGUFReader(gguf).tensors
    tied = not any(t.name == "output.weight" for t in tensors)
    return sum(int(t.n_bytes) * (top_k / experts if "_exps." in t.name else 1) for t in tensors
               if t.name != "token_embd.weight" or tied)


def kv_read_per_token(cfg: dict, positions: float, element_bytes: int) -> float:
    """Bytes a decode step's attention reads from the KV cache over `positions` cached positions (each
    layer's sliding window caps its own), `element_bytes` per element: keys and values per KV head, or
    with latent attention the latent and the rotated key (memory_plan.c em_kv_rows)."""
    windows = cfg.get("layer_windows") or [0] * cfg["num_layers"]
    per_position = (cfg["kv_lora_rank"] + cfg["head_dim"] if cfg.get("attention") == "mla"
                    else 2 * cfg["num_kv_heads"] * cfg["head_dim"])
    return sum(min(positions, w) if w else positions for w in windows) * per_position * element_bytes


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@bench_cmd.command("kernels")
@click.option("--shapes", default="256x320,4096x14336", show_default=True,
              help="Comma-separated HIDDENxINTERMEDIATE expert shapes (the default: the bundled model, Mixtral-8x7B).")
@click.option("--bits", "bits_list", type=_NumberList(int, choices=(2, 3, 4, 8)), default="4,8", show_default=True)
@click.option("--target", default="host", show_default=True)
@click.option("--number", type=click.IntRange(min=1), default=20, show_default=True,
              help="Calls per timing (TVM time_evaluator).")
@click.option("--llama-cpp", "tree", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="A built llama.cpp tree with build/bin/test-backend-ops: adds ggml's kernel on the shapes its "
                   "perf suite has.")
@click.option("--tuned", is_flag=True,
              help="Also time the integer-dot kernels with the tuning store's schedules (tuning those without a "
                   "record first, as edgemoe-tune would) and print them against the hand schedule.")
@click.option("--store", "store_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="With --tuned: the tuning store folder [default: as edgemoe-tune].")
@plot_option("kernels")
def kernels_cmd(shapes, bits_list, target, number, tree, tuned, store_dir, plot_path, no_plot):
    """Expert GEMV kernels, both formulations: µs, GB/s of packed weights, and ratios to memcpy, NumPy
    float32 and llama.cpp, in one run; with --tuned, the integer-dot kernels' tuned schedules against
    their hand schedule, each pair timed alternately."""
    shape_list = []
    for shape in shapes.split(","):
        m = re.fullmatch(r"\s*([0-9]+)\s*[xX]\s*([0-9]+)\s*", shape)
        if not m or int(m.group(1)) % 32 or int(m.group(2)) % 32 or not int(m.group(1)) or not int(m.group(2)):
            raise click.BadParameter(f"{shape!r} is not HIDDENxINTERMEDIATE with both sizes positive multiples "
                                     f"of 32, e.g. 4096x14336", param_hint="--shapes")
        shape_list.append((int(m.group(1)), int(m.group(2))))
    import numpy as np
    import tvm

    from . import llamacpp
    from .compiler import int_dot, kernels
    from .compiler.quantize import quantize, tiles_fit
    from .compiler.schedules import PARALLEL_MIN_BYTES, schedule
    from .compiler.tuning import TuningError, TuningStore, kernel_key, label, tune
    from .models import MoEConfig
    from .targets import load_target

    desc = load_target(target)
    tgt = desc.tvm()
    store = TuningStore(desc, store_dir) if tuned else None
    bw = copy_bandwidth()
    rng = np.random.default_rng(0)
    click.echo(f"memcpy bandwidth (read + write, one thread): {bw / 1e9:.1f} GB/s; TVM runtime threads: "
               f"{os.environ.get('TVM_NUM_THREADS', os.cpu_count())} (kernels with ≥ {PARALLEL_MIN_BYTES >> 10} KiB "
               f"of weights run their row loop in parallel); llama.cpp: test-backend-ops perf, CPU backend, "
               f"{max(1, (os.cpu_count() or 2) // 2)} thread(s)")
    click.echo("| kernel | H×I | bits | formulation | µs | GB/s weights | × memcpy | NumPy fp32 µs | × NumPy | "
               "llama.cpp µs | × llama.cpp |")
    click.echo("|---|---|---|---|---|---|---|---|---|---|---|")
    T = tvm.runtime.tensor
    chart = []
    pairs = []  # (kernel, H×I, bits, hand s, tuned s, weight bytes, knobs that differ from the hand schedule)
    for shape in shape_list:
        H, I = shape
        cfg = MoEConfig("bench", 8, H, 1, 1, 1, H, 1, 1, I, 8, 1e4, 1e-5)
        for bits in bits_list:
            ggml = {} if tree is None else {"down": llamacpp.matvec_us(tree, llamacpp.GGUF_TYPES[bits], H, I)}
            forms = [("float dequant", "rows", kernels)]
            if int_dot.supported(tgt) and tiles_fit(I, H, bits, 32) and tiles_fit(H, I, bits, 32):
                forms.append(("int8 dot", "tiles", int_dot))
            for form, layout, lib in forms:
                extra = (int_dot.isa_for(tgt),) if lib is int_dot else ()
                funcs = {f"em_expert_gate_up_w{bits}": lib.expert_gate_up(*extra, cfg, bits, 32),
                         f"em_expert_down_w{bits}": lib.expert_down(*extra, cfg, bits, 32)}
                mod = tvm.compile(schedule(tvm.IRModule(funcs)), target=tgt).mod
                best = {}  # kernel → (its module with the recorded schedule, the knobs that differ from the hand ones)
                if lib is int_dot and tuned:
                    variants = {f"em_expert_gate_up_w{bits}": lambda k: int_dot.expert_gate_up(*extra, cfg, bits, 32, k),
                                f"em_expert_down_w{bits}": lambda k: int_dot.expert_down(*extra, cfg, bits, 32, k)}
                    try:
                        tune(funcs, desc, store, number=number, progress=_tuning_steps, variants=variants)
                    except TuningError as e:
                        raise click.ClickException(str(e))
                    for n, f in funcs.items():
                        sched = store.schedule(kernel_key(n, f))
                        best[n] = (tvm.compile(tvm.IRModule({n: variants[n](int_dot.Knobs(**sched))}), target=tgt).mod,
                                   label(sched, asdict(int_dot.knobs_of(f))) or "the hand schedule")
                gq, uq = (quantize(rng.standard_normal((I, H), np.float32) * 0.02, bits, layout=layout) for _ in range(2))
                dq = quantize(rng.standard_normal((H, I), np.float32) * 0.02, bits, layout=layout)
                x, h, res = (T(rng.standard_normal(n).astype(np.float32)) for n in (H, I, H))
                cases = {
                    "gate_up": (f"em_expert_gate_up_w{bits}",
                                [x, T(gq.packed), T(gq.scales), T(uq.packed), T(uq.scales), T(np.zeros(I, np.float32))],
                                [gq, uq], (2 * I, H)),
                    "down": (f"em_expert_down_w{bits}",
                             [h, T(dq.packed), T(dq.scales), res, T(np.ones(1, np.float32)), T(np.zeros(H, np.float32))],
                             [dq], (H, I)),
                }
                for name, (sym, args, mats, (rows, cols)) in cases.items():
                    wbytes = sum(m.packed.nbytes + m.scales.nbytes for m in mats)
                    if sym in best:  # hand and tuned alternately, 5 times: both see the same machine
                        hand_t, tuned_t = [], []
                        for _ in range(5):
                            hand_t += mod.time_evaluator(sym, tvm.cpu(), number=number, repeat=1)(*args).results
                            tuned_t += best[sym][0].time_evaluator(sym, tvm.cpu(), number=number, repeat=1)(*args).results
                        t = min(hand_t)
                        pairs.append((name, f"{H}×{I}", bits, t, min(tuned_t), wbytes, best[sym][1]))
                    else:
                        t = min(mod.time_evaluator(sym, tvm.cpu(), number=number, repeat=3)(*args).results)
                    wf = rng.standard_normal((rows, cols), np.float32)
                    v = rng.standard_normal(cols, np.float32)
                    tn = min(_timed(lambda: wf @ v) for _ in range(number))
                    tl = ggml.get(name)
                    theirs = f"{tl:.1f} | {tl / 1e6 / t:.2f}" if tl else "– | –"
                    click.echo(f"| {name} | {H}×{I} | {bits} | {form} | {t * 1e6:.1f} | {wbytes / t / 1e9:.2f} | "
                               f"{wbytes / t / bw:.2f} | {tn * 1e6:.1f} | {tn / t:.2f} | {theirs} |")
                    chart.append({"kernel": name, "shape": f"{H}×{I}", "bits": bits, "formulation": form,
                                  "us": t * 1e6, "gbps": wbytes / t / 1e9})
    if pairs:
        isa = int_dot.isa_for(tgt)
        click.echo(f"\nint8 dot ({isa.name}, target {target}): the tuning store's schedules against the hand "
                   f"schedule ({store.path})")
        click.echo("| kernel | H×I | bits | hand µs | hand GB/s | hand × memcpy | tuned µs | tuned GB/s | tuned × memcpy | "
                   "tuned / hand speed | tuned knobs (others as the hand schedule) |")
        click.echo("|---|---|---|---|---|---|---|---|---|---|---|")
        for name, shape, bits, th, tt, wbytes, knobs in pairs:
            click.echo(f"| {name} | {shape} | {bits} | {th * 1e6:.1f} | {wbytes / th / 1e9:.2f} | {wbytes / th / bw:.2f} | "
                       f"{tt * 1e6:.1f} | {wbytes / tt / 1e9:.2f} | {wbytes / tt / bw:.2f} | {th / tt:.2f} | {knobs} |")
            chart.append({"kernel": name, "shape": shape, "bits": bits, "formulation": "int8 dot, tuned",
                          "us": tt * 1e6, "gbps": wbytes / tt / 1e9})
    write_plot(plot_path, no_plot, "kernels", chart, bw / 1e9, title=f"Expert GEMV kernels on {target}")


def _tuning_steps(groups):
    """Progress of a tuning round on stderr (the table goes to stdout)."""
    for group in groups:
        click.echo(f"tuning {group[0].kernel}: {len(group)} schedules", err=True)
        yield group


@bench_cmd.command("bitplans")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--calibration", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="Text the experts are rounded against (and, without --search-text, the search's).")
@click.option("--search-text", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="As edgemoe-compile: text the search measures sensitivity on (3/4) and checks plans on (1/4).")
@click.option("--calibration-tokens", type=click.IntRange(min=1), default=8192, show_default=True,
              help="As edgemoe-compile: tokens of each text to read.")
@click.option("--text", "text_paths", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              multiple=True, help="Held-out text for a perplexity column (never seen by the search); repeatable.")
@click.option("--tokens", "n_tokens", type=click.IntRange(min=2), default=4096, show_default=True,
              help="Held-out tokens to score per text.")
@click.option("--tolerances", type=_NumberList(float, 0, 100, lo_open=True, hi_open=True, allow_empty=True),
              default="0.5,1,2,5", show_default=True, help="Percent perplexity loss allowed; '' for none.")
@click.option("--max-bits", "bit_targets", type=_NumberList(float, 2, 8, allow_empty=True), default="3",
              show_default=True,
              help="Average-bits targets to search plans for (as edgemoe-compile --max-bits); '' for none.")
@click.option("--greedy-tokens", type=click.IntRange(min=1), default=32, show_default=True,
              help="Tokens generated per prompt for agreement.")
@click.option("--target", default="host", show_default=True,
              help="Score plans as edgemoe-compile would build them for this target (trunk INT8, its kernels).")
@click.option("--sensitivity", "methods", type=click.Choice(["measured", "estimated"]), multiple=True,
              default=("measured",), show_default=True,
              help="How the searches rank experts (as edgemoe-compile --sensitivity); repeat for both: then each goal "
                   "is searched both ways and the two rankings' rank correlation is printed, with the measured "
                   "ranking's own on the first --text.")
@plot_option("bitplans")
def bitplans_cmd(model_dir, calibration, search_text, calibration_tokens, text_paths, n_tokens, tolerances,
                 bit_targets, greedy_tokens, target, methods, plot_path, no_plot):
    """Uniform INT8/4/3/2 against searched per-expert plans: bits, image size, held-out perplexity, greedy agreement."""
    import numpy as np
    from scipy.stats import spearmanr
    from tokenizers import Tokenizer

    from .compiler.bitplan import BASE, LEVELS, PlanEvaluator, search_plan, sensitivities, split_tokens, uniform
    from .compiler.cache import cache_dir
    from dataclasses import replace

    from .compiler.driver import CompileOptions, trunk_bits, weight_layout
    from .compiler.expert_image import image_bytes
    from .compiler.expert_pool import ExpertPool, default_jobs
    from .compiler.plan_pass import estimate_errors, search_plan_estimated
    from .compiler.profile import expert_moments, tokenize_file
    from .compiler.quantize import DEFAULT_GROUP, compiled_trunk, quantized_model
    from .evaluate import greedy_agreement, perplexity_reference
    from .models import load_model
    from .models.reference import ReferenceExecutor
    from .progressbar import terminal_progress
    from .targets import load_target

    model = load_model(model_dir)
    cfg = model.config
    opts = CompileOptions(target=target)
    opts = replace(opts, trunk_bits=trunk_bits(model, opts))
    layout = weight_layout(cfg, load_target(target), opts, list(LEVELS))
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    calib = tokenize_file(model_dir / "tokenizer.json", calibration, calibration_tokens)
    fit, search, check = split_tokens(calib, None if search_text is None else tokenize_file(
        model_dir / "tokenizer.json", search_text, calibration_tokens))
    held = [tokenize_file(model_dir / "tokenizer.json", p, n_tokens) for p in text_paths]
    prompts = [tok.encode(p).ids for p in BITPLAN_PROMPTS]

    def greedy(m):
        return [ReferenceExecutor(m).greedy(p, greedy_tokens)[0] for p in prompts]

    float_ppl = [perplexity_reference(model, h)["perplexity"] for h in held]
    float_greedy = greedy(model)
    trunk = compiled_trunk(model, opts.trunk_bits, DEFAULT_GROUP, layout)
    moments = expert_moments(trunk, fit, progress=terminal_progress)
    plans = [(f"uniform INT{b}", uniform(model, b), None) for b in LEVELS]
    goals = [(f"tolerance {t:g}%", {"tolerance": t / 100}) for t in tolerances] + \
        [(f"≤ {b:g} bits", {"max_bits": b}) for b in bit_targets]
    both = len(set(methods)) == 2
    with ExpertPool(default_jobs()) as pool:
        for (name, goal), method in [(g, m) for g in goals for m in dict.fromkeys(methods)]:
            click.echo(f"searching a plan: {name}, {method} sensitivity ...", err=True)
            log = lambda m: click.echo(f"  {m}", err=True)  # noqa: E731
            if method == "measured":
                found = search_plan(model, search, check, group=DEFAULT_GROUP, cache_dir=cache_dir(), log=log,
                                    trunk_bits=opts.trunk_bits, layout=layout, moments=moments,
                                    progress=terminal_progress, **goal)
            else:
                found = search_plan_estimated(model, trunk, fit, search, check, goal.get("tolerance"),
                                              goal.get("max_bits"), DEFAULT_GROUP, pool, log, terminal_progress)
            plans.append((f"{name} ({method})" if both else name, found.plan, found))
        if both:  # the measured table is cached on disk by now
            measured = sensitivities(PlanEvaluator(model, search, DEFAULT_GROUP, opts.trunk_bits, layout, moments),
                                     cache_dir())
            errors = estimate_errors(trunk, fit, LEVELS, DEFAULT_GROUP, pool)
            rho = ", ".join(f"INT{b} {spearmanr((errors[b] - errors[BASE]).ravel(), measured[b].ravel())[0]:.2f}"
                            for b in LEVELS if b != BASE)
            click.echo(f"rank correlation (Spearman) of estimated with measured sensitivities, from INT{BASE}: {rho}")
            # the measurement's own reproducibility: the same table measured on as many tokens of the first held-out text
            again = sensitivities(PlanEvaluator(model, held[0][:len(search)], DEFAULT_GROUP, opts.trunk_bits, layout,
                                                moments), cache_dir())
            rho = ", ".join(f"INT{b} {spearmanr(again[b].ravel(), measured[b].ravel())[0]:.2f}"
                            for b in LEVELS if b != BASE)
            click.echo(f"rank correlation of measured sensitivities on {len(search)} tokens of {text_paths[0].name} "
                       f"with those on the search tokens: {rho}")
    texts = ", ".join(f"{p:.3f} over {len(h)} tokens of {t.name}" for p, h, t in zip(float_ppl, held, text_paths))
    click.echo(f"model {model_dir}: {cfg.num_layers}×{cfg.num_experts} experts; float perplexity {texts}; "
               f"experts rounded on {len(fit)} tokens of {calibration.name}; search on {len(search)} / check on "
               f"{len(check)} tokens of {(search_text or calibration).name}; greedy agreement over "
               f"{len(prompts)} prompts × {greedy_tokens} tokens; plans scored as compiled for {target}: trunk "
               f"INT{opts.trunk_bits}, {layout} layout")
    columns = "".join(f" {t.name} ppl | Δ |" for t in text_paths)
    click.echo(f"| plan | INT{'/'.join(map(str, LEVELS))} experts | avg bits | image |{columns} check loss | "
               "greedy agreement |")
    click.echo("|---|---|---|---|" + "---|---|" * len(held) + "---|---|")
    chart = []
    for name, plan, found in plans:
        qmodel = quantized_model(model, plan, opts.trunk_bits, DEFAULT_GROUP, layout, moments)
        ppl = [perplexity_reference(qmodel, h)["perplexity"] for h in held]
        agree = [greedy_agreement(a, b)["agreement"] for a, b in zip(float_greedy, greedy(qmodel))]
        counts = "/".join(str(sum(row.count(b) for row in plan)) for b in LEVELS)
        check = f"{100 * found.check_loss:+.2f}%" if found else "-"
        scores = "".join(f" {p:.3f} | {100 * (p / f - 1):+.2f}% |" for p, f in zip(ppl, float_ppl))
        click.echo(f"| {name} | {counts} | {np.mean(plan):.2f} | "
                   f"{fmt_bytes(image_bytes(plan, cfg.hidden_size, cfg.expert_intermediate, DEFAULT_GROUP))} |"
                   f"{scores} {check} | {np.mean(agree):.1%} |")
        chart.append({"plan": name, "average_bits": float(np.mean(plan)), "searched": found is not None,
                      "loss_pct": [100 * (p / f - 1) for p, f in zip(ppl, float_ppl)]})
    write_plot(plot_path, no_plot, "bitplans", chart, [t.name for t in text_paths],
               title=f"{model_dir.name}: held-out perplexity loss against average expert bits")


BITPLAN_PROMPTS = ["ROMEO:\n", "The history of the city begins in", "To create a list in Python, use",
                   "KING HENRY:\nWhat say you", "The album was released in"]


@bench_cmd.command("budget")
@click.argument("artifacts", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--budget", "nbytes", type=_Bytes(), required=True, help="Memory budget for every artifact, e.g. 8MiB.")
@click.option("--prompt", default="The history of the city begins in", show_default=True)
@click.option("--tokens", default=None, help="Comma-separated prompt token ids instead of --prompt (for artifacts "
                                             "without tokenizer.json).")
@click.option("-n", "n_new", type=click.IntRange(1, UINT32_MAX), default=64, show_default=True)
@click.option("--emulate-storage", "storage", default="rpi4", show_default=True, metavar="TARGET|MBPS,MS")
@click.option("--predictor", type=click.Choice(["none", "path-table", "next-router", "fitted-router", "wrong"]),
              default="next-router", show_default=True)
@click.option("--eviction", type=click.Choice(["lru", "fifo", "edgemoe"]), default="lru", show_default=True)
@board_option
@click.option("--max-seq", type=click.IntRange(1, UINT32_MAX), default=256, show_default=True)
@plot_option("budget")
def budget_cmd(artifacts, nbytes, prompt, tokens, n_new, storage, compute_spec, predictor, eviction, max_seq,
               plot_path, no_plot):
    """Artifacts side by side at one memory budget (e.g. a searched bit plan against uniform INT4)."""
    emulate, compute, where = board_emulation(storage, compute_spec)
    manifests = [read_manifest(art) for art in artifacts]
    prompts = [prompt_ids(art, prompt, tokens) for art in artifacts]
    for art, manifest, ids in zip(artifacts, manifests, prompts):
        check_context(ids, n_new, max_seq, manifest, art)
        if not manifest.get("profile") and needs_profile(RunConfig("", None, predictor=predictor, eviction=eviction)):
            raise click.ClickException(f"{art} was compiled without calibration text (no routing profile): "
                                       f"--predictor {predictor} / --eviction {eviction} need one; choose another "
                                       f"or compile with --calibration TEXT")
    click.echo(f"budget {fmt_bytes(nbytes)}, {where}, predictor {predictor}, eviction {eviction}, {n_new} tokens")
    click.echo("| artifact | avg bits | cache slots | ms/token | cache hit | read/token | stall ms/token |")
    click.echo("|---|---|---|---|---|---|---|")
    chart = []
    for art, manifest, ids in zip(artifacts, manifests, prompts):
        cfg = RunConfig(str(art), None, predictor=predictor, eviction=eviction, budget=nbytes)
        r = run_config(art, cfg, ids, n_new, emulate, max_seq, compute=compute)
        click.echo(f"| {art} | {manifest['quantization']['average_bits']:.2f} | {r['cache_slots']} | "
                   f"{r['ms_per_token']:.2f} | {r['hit_rate']:.1%} | {fmt_bytes(r['bytes_read_per_token'])} | "
                   f"{r['stall_ms_per_token']:.2f} |")
        chart.append({"artifact": str(art), "average_bits": manifest["quantization"]["average_bits"],
                      "ms_per_token": r["ms_per_token"], "hit_rate": r["hit_rate"], "cache_slots": r["cache_slots"]})
    write_plot(plot_path, no_plot, "budget", chart,
               title=f"budget {fmt_bytes(nbytes)}, {where}, {predictor} prediction, {eviction} eviction")


@bench_cmd.command("llamacpp")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("artifacts", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--llama-cpp", "tree", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="A built llama.cpp source tree (its convert_hf_to_gguf.py, build/bin/llama-bench, llama-quantize).")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("build/gguf"),
              show_default=True, help="Where the GGUF files are written (reused when present).")
@click.option("-n", "n_new", type=click.IntRange(1, 247), default=64, show_default=True,
              help="Decode tokens after a 9-token prompt (the context is then at most 256) or --depth tokens.")
@click.option("--threads", type=_NumberList(int, 1, MAX_THREADS), default="1,2", show_default=True,
              help="Thread counts to run (both).")
@click.option("--depth", type=click.IntRange(0, 1 << 20), default=0, show_default=True,
              help="Tokens already in the context when the decode starts (llama-bench -d; EdgeMoE prefills a "
                   "prompt that long): attention's share of a step grows with it.")
@click.option("--prompt-tokens", type=click.IntRange(1, 1 << 20), default=None,
              help="Time taking in a prompt this long instead of decoding (llama-bench -p N -n 0; EdgeMoE's "
                   "prefill at its default batch).")
@plot_option("llamacpp")
def llamacpp_cmd(model_dir, artifacts, tree, work_dir, n_new, threads, depth, prompt_tokens, plot_path, no_plot):
    """Whole-model decode (or, with --prompt-tokens, prompt processing), all experts resident: EdgeMoE
    artifacts against llama-bench on GGUFs of the same model at the nearest bit width, in one run."""
    from . import llamacpp

    if prompt_tokens:
        return _llamacpp_prompt(model_dir, artifacts, tree, work_dir, threads, prompt_tokens, plot_path, no_plot)

    prompt_len = max(depth, 9)  # the context EdgeMoE prefills
    for art in artifacts:  # before the conversion: a context the artifact cannot hold is named first
        held = read_manifest(art)["max_seq"]
        if depth and prompt_len + n_new > held:
            raise click.BadParameter(f"{depth} context tokens + {n_new} new ones need {prompt_len + n_new} positions "
                                     f"but {art} holds at most {held}: lower --depth or -n, or compile with "
                                     f"--max-seq {prompt_len + n_new} or more", param_hint="--depth")
    work_dir.mkdir(parents=True, exist_ok=True)
    f16 = llamacpp.convert(tree, model_dir, work_dir / f"{model_dir.name}-f16.gguf")
    counts = threads
    after = f"after {depth} context tokens" if depth else "after a 9-token prompt (llama.cpp: an empty context)"
    click.echo(f"model {model_dir}; {n_new} decode tokens {after}; EdgeMoE: IO-FREE (every expert resident after a "
               f"warm-up run), best of 5 runs; llama.cpp: llama-bench -p 0 -n {n_new}{f' -d {depth}' if depth else ''} "
               f"-r 5, best repetition; both at the same thread count")
    bandwidth = {t: read_bandwidth(t) for t in counts}
    click.echo("memory read bandwidth (NumPy sums over 1 GiB, best of 5): " +
               ", ".join(f"{bw / 1e9:.1f} GB/s at {t} thread{'s' if t != 1 else ''}" for t, bw in bandwidth.items()) +
               "; a step reads at least its weights (EdgeMoE: the trunk but the embedding table, top-k experts per "
               "layer; llama.cpp: its tensors but token_embd, the routed experts' at top-k / experts) and its KV "
               "cache over the mean context (EdgeMoE: the artifact's, KV column; llama.cpp float16: its default), so "
               "bandwidth ÷ bytes read per token bounds tok/s")
    click.echo("| expert bits | trunk | EdgeMoE kernels | KV cache | llama.cpp format | EdgeMoE / GGUF bytes | threads | "
               "EdgeMoE tok/s | llama.cpp tok/s | × llama.cpp | read per token EdgeMoE / llama.cpp | "
               "memory bound tok/s EdgeMoE / llama.cpp |")
    click.echo("|---|---|---|---|---|---|---|---|---|---|---|---|")
    chart = []
    for art in artifacts:
        manifest = read_manifest(art)
        bits = manifest["quantization"]["expert_bits"]
        if bits is None:
            raise click.ClickException(f"{art} mixes expert bitwidths; compare artifacts of one bitwidth")
        gtype = llamacpp.GGUF_TYPES[bits]
        gguf = llamacpp.quantize(tree, f16, gtype)
        trunk_bits = manifest["quantization"].get("trunk_bits", 32)
        trunk = "float32" if trunk_bits == 32 else f"INT{trunk_bits}"
        form = "int8 dot" if manifest["quantization"].get("layout") == "tiles" else "float dequant"
        sizes = f"{fmt_bytes(manifest['trunk_bytes'] + manifest['experts']['image_bytes'])} / " \
                f"{fmt_bytes(gguf.stat().st_size)}"
        cfg = manifest["model"]["config"]
        ids = [1] + [10 + i % (cfg["vocab_size"] - 10) for i in range(prompt_len - 1)]
        positions = len(ids) + n_new / 2  # the mean context over the decode
        kv_cache = manifest.get("kv_cache", "float32")
        kv_bytes = 2 if kv_cache == "float16" else 4
        read = (artifact_read_per_token(art) + kv_read_per_token(cfg, positions, kv_bytes),
                gguf_read_per_token(gguf, cfg["top_k"], cfg["num_experts"]) + kv_read_per_token(cfg, positions, 2))
        max_seq = len(ids) + n_new if depth else min(256, 2 * n_new + 16)
        for t in counts:
            # best of 5, as llama-bench's best repetition: the least disturbed run on a shared machine
            ours = max(1e3 / run_config(art, RunConfig("IO-FREE", None, warm=True, threads=t), ids, n_new, None,
                                        max_seq)["ms_per_token"] for _ in range(5))
            theirs = llamacpp.bench_decode(tree, gguf, n_new, t, depth=depth)
            click.echo(f"| INT{bits} | {trunk} | {form} | {kv_cache} | {gtype} | {sizes} | {t} | {ours:.0f} | {theirs:.0f} | "
                       f"{ours / theirs:.2f} | {fmt_bytes(read[0])} / {fmt_bytes(read[1])} | "
                       f"{bandwidth[t] / read[0]:.0f} / {bandwidth[t] / read[1]:.0f} |")
            chart.append({"label": f"INT{bits} / {gtype}, KV {kv_cache}\n{t} thread{'s' if t != 1 else ''}", "ours": ours,
                          "theirs": theirs})
    write_plot(plot_path, no_plot, "llamacpp", chart,
               title=f"{model_dir.name}: decode tok/s, all experts resident, {n_new} tokens"
                     + (f" after {depth} in context" if depth else ""))


def _llamacpp_prompt(model_dir, artifacts, tree, work_dir, counts, n_prompt, plot_path, no_plot):
    """edgemoe-bench llamacpp --prompt-tokens: prompt processing, every expert resident, both engines."""
    from . import llamacpp
    from .runtime import Session

    for art in artifacts:  # before the conversion: a prompt the artifact cannot hold is named first
        held = read_manifest(art)["max_seq"]
        if n_prompt > held:
            raise click.BadParameter(f"{n_prompt} tokens is more than {art}'s maximum context {held}: lower "
                                     f"--prompt-tokens or compile with --max-seq {n_prompt} or more",
                                     param_hint="--prompt-tokens")
    work_dir.mkdir(parents=True, exist_ok=True)
    f16 = llamacpp.convert(tree, model_dir, work_dir / f"{model_dir.name}-f16.gguf")
    click.echo(f"model {model_dir}; a {n_prompt}-token prompt, every expert resident; EdgeMoE: prefill at the "
               f"runtime's default batch after a warm-up run, best of 5; llama.cpp: llama-bench -p {n_prompt} -n 0 "
               f"-r 5, best repetition; both at the same thread count")
    click.echo("| expert bits | trunk | EdgeMoE kernels | llama.cpp format | threads | EdgeMoE prompt tok/s | "
               "llama.cpp prompt tok/s | × llama.cpp |")
    click.echo("|---|---|---|---|---|---|---|---|")
    chart = []
    for art in artifacts:
        manifest = read_manifest(art)
        bits = manifest["quantization"]["expert_bits"]
        if bits is None:
            raise click.ClickException(f"{art} mixes expert bitwidths; compare artifacts of one bitwidth")
        gtype = llamacpp.GGUF_TYPES[bits]
        gguf = llamacpp.quantize(tree, f16, gtype)
        trunk_bits = manifest["quantization"].get("trunk_bits", 32)
        form = ("batched int8 dot" if batched_kernels(art) else "int8 dot") \
            if manifest["quantization"].get("layout") == "tiles" else "float dequant"
        vocab = manifest["model"]["config"]["vocab_size"]
        ids = [1] + [10 + i % (vocab - 10) for i in range(n_prompt - 1)]
        for t in counts:
            with Session(art, max_seq=n_prompt, threads=t) as s:
                s.prefill(ids)  # every expert read once: resident from now on
                best = float("inf")
                for _ in range(5):
                    s.reset()
                    t0 = time.perf_counter()
                    s.prefill(ids)
                    best = min(best, time.perf_counter() - t0)
            ours, theirs = n_prompt / best, llamacpp.bench_prompt(tree, gguf, n_prompt, t)
            click.echo(f"| INT{bits} | {'float32' if trunk_bits == 32 else f'INT{trunk_bits}'} | {form} | {gtype} | {t} | "
                       f"{ours:.0f} | {theirs:.0f} | {ours / theirs:.2f} |")
            chart.append({"label": f"INT{bits} / {gtype}\n{t} thread{'s' if t != 1 else ''}", "ours": ours,
                          "theirs": theirs})
    write_plot(plot_path, no_plot, "llamacpp", chart, what="prompt",
               title=f"{model_dir.name}: prompt tok/s, {n_prompt} tokens, all experts resident")


@bench_cmd.command("largemodel")
@click.option("--shape", type=click.Choice(["olmoe-1b-7b", "mixtral-8x7b", "qwen3-30b-a3b"]), default="olmoe-1b-7b",
              show_default=True, help="Published model shape of the random-weight checkpoint made for the bench.")
@click.option("--layers", type=click.IntRange(1, 1024), default=None,
              help="Decoder layers [the shape's]: fewer to fit a large shape on the disk at hand.")
@click.option("--llama-cpp", "tree", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="A built llama.cpp tree (convert_hf_to_gguf.py, build/bin/llama-bench, llama-quantize): "
                   "LLAMACPP_NATIVE=1 LLAMACPP_TOOLS='llama-quantize llama-bench' scripts/fetch-llamacpp.sh")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("build/large"),
              show_default=True, help="Checkpoint, artifact and GGUFs (each reused when present).")
@click.option("--bits", type=click.Choice(["4", "8"]), default="4", show_default=True,
              help="Expert and trunk bits (against llama.cpp's Q4_0 / Q8_0).")
@click.option("--calibration", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Compile with this calibration text (GPTQ rounding, routing profile).")
@click.option("--calibration-tokens", type=click.IntRange(1), default=8192, show_default=True,
              help="Tokens of the calibration text the compile uses.")
@click.option("--compile-cap", type=_Bytes(1 << 20), default="4GiB", show_default=True,
              help="RAM cap (cgroup, page cache included) the compile runs under.")
@click.option("--jobs", type=click.IntRange(1, 4096), default=None, help="Compile worker processes.")
@click.option("--fractions", type=_NumberList(float, 0, 1, lo_open=True), default="0.1,0.25,0.5,1",
              show_default=True, help="Expert cache sizes as fractions of all experts; 1 runs without a cap.")
@click.option("--allowance", type=_Bytes(0), default="64MiB", show_default=True,
              help="RAM beyond EdgeMoE's budget in the cap (code, stack, allocator), the same for both.")
@click.option("-n", "n_new", type=click.IntRange(1, 1000), default=8, show_default=True)
@click.option("--threads", type=click.IntRange(1, MAX_THREADS), default=2, show_default=True)
@click.option("--llama-timeout", type=click.IntRange(10), default=300, show_default=True,
              help="Seconds a llama.cpp run may take; one that thrashes past it is reported as a rate bound.")
@plot_option("largemodel")
def largemodel_cmd(shape, layers, tree, work_dir, bits, calibration, calibration_tokens, compile_cap, jobs, fractions,
                   allowance, n_new, threads, llama_timeout, plot_path, no_plot):
    """A real-size MoE (random weights in a published shape, written at bench time) through the
    streaming compile under a RAM cap, then decoded by EdgeMoE and by llama.cpp (mmap, the same
    weights through its own converter and quantizer) under the same RAM cap, which the kernel
    enforces on each process with its page cache (a memory cgroup), storage read for real (the page
    cache dropped before each run). One run: tokens/s, bytes read from storage per token, peak memory."""
    from . import llamacpp
    from .memcap import drop_page_cache, run_capped
    from .runtime import budget_bytes, build_runtime
    from .models.random_checkpoint import write as write_checkpoint

    bits = int(bits)
    gtype = llamacpp.GGUF_TYPES[bits]
    llamacpp.check_tree(tree, ())  # the source tree now; its built tools once the compile is done
    work_dir.mkdir(parents=True, exist_ok=True)
    name = f"{shape}{f'-{layers}l' if layers else ''}"
    ckpt = work_dir / f"{name}-random"
    if not (ckpt / "config.json").is_file():
        click.echo(f"writing {ckpt} (random weights, {shape} shape)", err=True)
        write_checkpoint(ckpt, shape, layers)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    n_params = index["metadata"]["total_size"] // 2  # bfloat16
    art = work_dir / f"{name}-int{bits}{'-calibrated' if calibration else ''}"
    record = art.with_name(art.name + ".compile.json")
    if not (art / "manifest.json").is_file():
        cmd = [sys.executable, "-c", "from edgemoe.cli import compile_cmd; compile_cmd()", str(ckpt), "-o", str(art),
               "--bits", str(bits), "--trunk-bits", str(bits)]
        cmd += ["--calibration", str(calibration), "--calibration-tokens", str(calibration_tokens)] if calibration else []
        cmd += ["--jobs", str(jobs)] if jobs else []
        click.echo(f"compiling under a {fmt_bytes(compile_cap)} cap: {' '.join(cmd[3:])}", err=True)
        drop_page_cache(sorted(ckpt.glob("*.safetensors")))
        run = run_capped(cmd, compile_cap)
        if run.returncode != 0:
            why = " (killed: the cap was reached)" if run.returncode == -9 else ""
            raise click.ClickException(f"the compile failed{why}: {run.stderr.strip()[-1500:]}")
        record.write_text(json.dumps({"wall_s": run.wall_s, "peak_bytes": run.peak_bytes, "cap_bytes": compile_cap,
                                      "max_rss_bytes": run.max_rss_bytes, "anon_bytes": run.peak_anon_bytes,
                                      "calibration": str(calibration or ""),
                                      "calibration_tokens": calibration_tokens, "log": run.stderr[-4000:]}))
    compiled = json.loads(record.read_text()) if record.is_file() else None
    llamacpp.check_tree(tree, ("llama-quantize", "llama-bench"))
    f16 = llamacpp.convert(tree, ckpt, work_dir / f"{name}-f16.gguf")
    gguf = llamacpp.quantize(tree, f16, gtype)
    manifest = read_manifest(art)
    ours_bytes = manifest["trunk_bytes"] + manifest["experts"]["image_bytes"]
    click.echo(f"{name}: {n_params / 1e9:.2f} B parameters (random, bfloat16, {fmt_bytes(2 * n_params)}); EdgeMoE "
               f"INT{bits} experts and trunk, {fmt_bytes(ours_bytes)}; llama.cpp {gtype}, {fmt_bytes(gguf.stat().st_size)}")
    if compiled:
        text = f" with {compiled['calibration_tokens']} tokens of {Path(compiled['calibration']).name}" \
            if compiled["calibration"] else ""
        click.echo(f"compile{text}: {compiled['wall_s']:.0f} s wall, {n_params / compiled['wall_s'] / 1e6:.1f} M "
                   f"parameters/s; peak {fmt_bytes(compiled['peak_bytes'])} (RSS and page cache, cgroup) under a "
                   f"{fmt_bytes(compiled['cap_bytes'])} cap; RSS of all its processes {fmt_bytes(compiled['anon_bytes'])} "
                   f"(sampled), largest process {fmt_bytes(compiled['max_rss_bytes'])}")
    binary = build_runtime().parent / "edgemoe_run"
    max_seq = n_new + 8
    total_ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    click.echo(f"{n_new} tokens greedy from the BOS token, {threads} threads; the page cache dropped before every "
               f"run; cap = EdgeMoE's budget + {fmt_bytes(allowance)} for both (none at 100%); tok/s over the "
               f"generated tokens after a warm-up (EdgeMoE: edgemoe_run --repeat 2, the second round's decode loop; "
               f"llama.cpp: llama-bench -p 0 -n {n_new} -r 1, after its warm-up token); read = bytes from storage over "
               f"the whole run (load and warm-up included) per token generated")
    click.echo("| experts in RAM | RAM cap | EdgeMoE tok/s | llama.cpp tok/s | × llama.cpp | EdgeMoE read/token | "
               "llama.cpp read/token | EdgeMoE peak | llama.cpp peak |")
    click.echo("|---|---|---|---|---|---|---|---|---|")
    chart = []
    for fraction in fractions:
        budget = budget_bytes(art, max_seq, fraction) if fraction < 1 else 0
        cap = budget + allowance if fraction < 1 else total_ram
        drop_page_cache([art / "experts.bin", art / "trunk.bin"])
        # two rounds, timing the second: llama-bench also generates a warm-up token before it times
        ours = run_capped([str(binary), str(art), "--tokens", "1", "-n", str(n_new), "--max-seq", str(max_seq),
                           "--threads", str(threads), "--ignore-eos", "--repeat", "2"] +
                          (["--budget", str(budget)] if budget else []), cap)
        if ours.returncode != 0:
            raise click.ClickException(f"edgemoe_run failed at {fraction:.0%} (exit {ours.returncode}"
                                       f"{', killed by the cap' if ours.returncode == -9 else ''}): {ours.stderr[-800:]}")
        st = _stats_lines(ours.stdout)
        ours_tps = n_new / (int(st["decode_ns"]) / 1e9)
        drop_page_cache([gguf])
        theirs_run = run_capped([str(llamacpp.tool(tree, "llama-bench")), "-m", str(gguf), "-p", "0", "-n",
                                 str(n_new), "-t", str(threads), "-r", "1", "-o", "json"], cap, timeout=llama_timeout)
        what = "no cap" if fraction >= 1 else fmt_bytes(cap)
        if theirs_run.timed_out:  # thrashing: not even n_new tokens (and its one warm-up token) in the time given
            theirs_tps = (n_new + 1) / theirs_run.wall_s
            their_cols = f"< {theirs_tps:.3f} (not done in {theirs_run.wall_s:.0f} s) | > {ours_tps / theirs_tps:.0f} | "
        elif theirs_run.returncode == 0:
            theirs_tps = llamacpp.decode_rate(theirs_run.stdout, n_new)
            their_cols = f"{theirs_tps:.2f} | {ours_tps / theirs_tps:.2f} | "
        else:
            theirs_tps = None
            their_cols = (f"failed ({'killed by the cap' if theirs_run.returncode == -9 else theirs_run.stderr[-200:]})"
                          f" | – | ")
        click.echo(f"| {fraction:.0%} | {what} | {ours_tps:.2f} | {their_cols}{fmt_bytes(ours.read_bytes / (2 * n_new))} | "
                   f"{fmt_bytes(theirs_run.read_bytes / (n_new + 1))} | {fmt_bytes(ours.peak_bytes)} | "
                   f"{fmt_bytes(theirs_run.peak_bytes)} |")
        chart.append({"label": f"{fraction:.0%} experts\n{what}", "ours": ours_tps, "theirs": theirs_tps or 0.0})
    write_plot(plot_path, no_plot, "llamacpp", chart,
               title=f"{name} (random weights): decode tok/s under a RAM cap, INT{bits} vs {gtype}")


@bench_cmd.command("onnxruntime")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("artifacts", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("build/onnx"),
              show_default=True, help="Where the ONNX export is written (reused when present).")
@click.option("-n", "n_new", type=click.IntRange(1, 240), default=32, show_default=True,
              help="Decode tokens after a 9-token prompt.")
@click.option("--threads", type=_NumberList(int, 1, MAX_THREADS), default="1,2", show_default=True)
def onnxruntime_cmd(model_dir, artifacts, work_dir, n_new, threads):
    """Whole-model decode, all in RAM: EdgeMoE artifacts against onnxruntime running the float
    checkpoint exported with torch.onnx (onnx_reference.py), at the same thread count. The exported
    graph has no KV cache, so onnxruntime runs the whole sequence for each token: its row is the
    all-in-RAM float baseline as ONNX carries it, not a cached decoder."""
    import time

    import numpy as np

    from .onnx_reference import OnnxModel, export

    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / f"{model_dir.name}.onnx"
    if not path.is_file():
        export(model_dir, path)
    tokenized = (artifacts[0] / "tokenizer.json").is_file()
    ids = prompt_ids(artifacts[0], "The history of the city begins in", None if tokenized else "1,10,11,12,13,14,15,16,17")
    click.echo(f"model {model_dir}; {len(ids)}-token prompt, {n_new} decode tokens; EdgeMoE: IO-FREE, best of 3; "
               f"onnxruntime: float32, the whole sequence per token (no KV cache in the graph), best of 3")
    click.echo("| artifact | expert bits | threads | EdgeMoE ms/token | onnxruntime ms/token | × onnxruntime | "
               "greedy tokens equal |")
    click.echo("|---|---|---|---|---|---|---|")
    for t in threads:
        onnx = OnnxModel(path, threads=t)
        theirs, want = float("inf"), onnx.greedy(ids, n_new)
        for _ in range(3):
            seq, times = list(ids), []
            for _ in range(n_new):
                t0 = time.perf_counter()
                seq.append(int(onnx.logits(seq)[-1].argmax()))
                times.append(time.perf_counter() - t0)
            theirs = min(theirs, 1e3 * float(np.mean(times)))
        for art in artifacts:
            bits = read_manifest(art)["quantization"]["average_bits"]
            runs = [run_config(art, RunConfig("IO-FREE", None, warm=True, threads=t), ids, n_new, None,
                               len(ids) + n_new) for _ in range(3)]
            ours = min(r["mean_ms_per_token"] for r in runs)
            same = sum(a == b for a, b in zip(runs[0]["tokens"], want))
            click.echo(f"| {art} | {bits:.2f} | {t} | {ours:.3f} | {theirs:.3f} | {theirs / ours:.1f} | "
                       f"{same}/{n_new} |")


def _stats_lines(stdout: str) -> dict:
    return dict(line.split("=", 1) for line in stdout.splitlines()[1:] if "=" in line)


@bench_cmd.command("soak")
@click.argument("artifact", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--tokens", "n_tokens", type=click.IntRange(1, 10**8), default=10000, show_default=True,
              help="tokens to decode in all, in rounds that each reset the context")
@click.option("--round", "round_tokens", type=click.IntRange(2, UINT32_MAX), default=250, show_default=True,
              help="tokens per round (prompt + generated); at most the artifact's context")
@click.option("--sanitizers/--no-sanitizers", default=True, show_default=True,
              help="also run the soak in an AddressSanitizer + LeakSanitizer + UBSan build (build/asan)")
@plot_option("soak")
def soak_cmd(artifact, n_tokens, round_tokens, sanitizers, plot_path, no_plot):
    """Decode many tokens at the minimum budget, the context reset every round: the tokens of every
    round must equal the first's, resident memory must not grow, and LeakSanitizer must find nothing."""
    import subprocess

    from .runtime import DEFAULT_BUILD_DIR, REPO_ROOT, budget_bytes, build_runtime

    manifest = read_manifest(artifact)
    round_tokens = min(round_tokens, manifest["max_seq"])
    prompt = "1,2,3"
    n_new = round_tokens - 3
    rounds = max(1, -(-n_tokens // round_tokens))
    budget = budget_bytes(artifact)
    builds = [("release", DEFAULT_BUILD_DIR)]
    if sanitizers:
        builds.append(("ASan+LSan+UBSan", build_runtime(REPO_ROOT / "build" / "asan", sanitize="address,undefined").parent))
    else:
        build_runtime()
    click.echo(f"{artifact}: {rounds} rounds of {round_tokens} tokens ({rounds * round_tokens} decoded), budget "
               f"{fmt_bytes(budget)} (the minimum), context reset every round")
    click.echo("| build | tokens | s | RSS after round 1 | RSS after the last | growth | every round's tokens equal | "
               "sanitizer reports |")
    click.echo("|---|---|---|---|---|---|---|---|")
    failed = False
    chart = []
    for name, build in builds:
        env = {**os.environ, "ASAN_OPTIONS": "detect_leaks=1", "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1"}
        t0 = time.perf_counter()
        proc = subprocess.run([str(build / "edgemoe_run"), str(artifact), "--tokens", prompt, "-n", str(n_new),
                               "--budget", str(budget), "--repeat", str(rounds)], capture_output=True, text=True,
                              env=env)
        seconds = time.perf_counter() - t0
        reports = sum(proc.stderr.count(k) for k in ("AddressSanitizer", "LeakSanitizer", "runtime error:"))
        if proc.returncode != 0:
            failed = True
            click.echo(f"| {name} | failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]} |||||||")
            chart.append({"build": name, "rss_first": None, "rss_last": None})
            continue
        st = _stats_lines(proc.stdout)
        first, last = int(st["rss_first_round_bytes"]), int(st["rss_last_round_bytes"])
        click.echo(f"| {name} | {st['tokens']} | {seconds:.1f} | {fmt_bytes(first)} | {fmt_bytes(last)} | "
                   f"{fmt_bytes(max(0, last - first))} | yes | {reports} |")
        chart.append({"build": name, "rss_first": first, "rss_last": last})
    write_plot(plot_path, no_plot, "soak", chart,
               title=f"{artifact.name}: {rounds} rounds of {round_tokens} tokens at the minimum budget")
    if failed:
        raise click.ClickException("the soak failed: see the table")
