"""Command-line entry points: edgemoe-compile and edgemoe-run."""
from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import click

from .units import fmt_bytes, parse_bytes


class _Bytes(click.ParamType):
    name = "SIZE"

    def convert(self, value, param, ctx):
        try:
            return value if isinstance(value, int) else parse_bytes(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


def _percent(text: str) -> float:
    """'1%' or '1' -> 0.01: tolerances are always given in percent."""
    try:
        value = float(text.strip().rstrip("%"))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a percentage; write e.g. --tolerance 1%") from None
    if not 0 < value < 100:
        raise click.BadParameter(f"tolerance {value}% is outside (0%, 100%); write e.g. --tolerance 1%")
    return value / 100.0


@click.command("edgemoe-compile")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Artifact directory to write.")
@click.option("--target", default="host", show_default=True, help="Board description in targets/.")
@click.option("--bits", "expert_bits", type=click.Choice(["2", "3", "4", "8", "16"]), default="4", show_default=True,
              help="Expert weight bitwidth (uniform; 16 = float16).")
@click.option("--trunk-bits", type=click.Choice(["4", "8", "32"]), default="8", show_default=True,
              help="Bitwidth of the trunk's matrices (attention projections, embedding / LM head); 32 = float32.")
@click.option("--group", default=32, show_default=True, help="Quantization group size along the input dimension.")
@click.option("--max-seq", type=int, default=None, help="Longest context the artifact supports [model max, ≤ 2048].")
@click.option("--calibration", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Text to profile expert routing on: enables the path-table predictor and EdgeMoE eviction.")
@click.option("--calibration-tokens", default=8192, show_default=True, help="Tokens of calibration text to use.")
@click.option("--tolerance", default=None, metavar="P%",
              help="Choose each expert's bitwidth (INT8/4/3/2) by measured sensitivity so perplexity rises at most "
                   "P% over the float model (needs --calibration); overrides --bits.")
@click.option("--max-bits", type=float, default=None, metavar="B",
              help="Choose each expert's bitwidth so the experts average at most B bits per weight, losing as "
                   "little as the measured sensitivities allow (needs --calibration; with --tolerance, the more "
                   "compact of the two plans); overrides --bits.")
@click.option("--search-text", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Text the bit-plan search scores plans on (3/4) and checks them on (1/4): best text the model "
                   "was not trained on [default: the calibration text].")
@click.option("--int-dot/--no-int-dot", default=None,
              help="Integer-dot kernels (int8 activations, AVX-512 VNNI) [default: where the target has them].")
@click.option("--tune", is_flag=True, help="Tune kernels that have no record in the tuning store for this target "
                                           "(on this machine) and record them; later compiles reuse the records.")
def compile_cmd(model_dir, out_dir, target, expert_bits, trunk_bits, group, max_seq, calibration, calibration_tokens,
                tolerance, max_bits, search_text, int_dot, tune):
    """Compile the MoE checkpoint in MODEL_DIR (Hugging Face layout) for a target board."""
    from .compiler.driver import CompileOptions, compile_model
    from .compiler.tuning import TuningError
    from .models import ModelImportError
    from .targets import UnknownTargetError

    try:
        tol = None if tolerance is None else _percent(tolerance)
        opts = CompileOptions(target, int(expert_bits), int(trunk_bits), group, max_seq, calibration,
                              calibration_tokens, tolerance=tol, max_bits=max_bits, search_text=search_text,
                              int_dot=int_dot, tune=tune)
        compile_model(model_dir, out_dir, opts, log=lambda m: click.echo(m, err=True), progress=_tuning_bar)
    except (ModelImportError, UnknownTargetError, TuningError, ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e))


def _tuning_bar(jobs):
    with click.progressbar(jobs, label="tuning kernels", file=sys.stderr,
                           item_show_func=lambda j: f"{j[0]} lanes {j[2]}" if j else "") as bar:
        yield from bar


@click.command("edgemoe-tune")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--target", default="host", show_default=True, help="Board description in targets/ (run it there).")
@click.option("--bits", "bits_list", default="2,3,4,8", show_default=True, help="Expert bitwidths to tune kernels for.")
@click.option("--trunk-bits", type=click.Choice(["4", "8", "32"]), default="8", show_default=True,
              help="Bitwidth of the trunk's matrices (attention projections, embedding / LM head); 32 = float32.")
@click.option("--group", default=32, show_default=True)
@click.option("--retune", is_flag=True, help="Tune again kernels that already have a record.")
@click.option("--store", "store_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Tuning store folder [default: $EDGEMOE_CACHE_DIR/tuning or ~/.cache/edgemoe/tuning].")
def tune_cmd(model_dir, target, bits_list, trunk_bits, group, retune, store_dir):
    """Tune the decode kernels of MODEL_DIR's shapes on this machine into the tuning store."""
    from .compiler.driver import CompileOptions, weight_layout
    from .compiler.kernels import decode_kernels
    from .compiler.schedules import DEFAULT_LANES
    from .compiler.tuning import TuningError, TuningStore, kernel_key, tunable, tune
    from .models import ModelImportError, load_model
    from .targets import UnknownTargetError, load_target

    try:
        tgt = load_target(target)
        cfg = load_model(model_dir).config
        bits = [int(b) for b in bits_list.split(",")]
        # the kernels edgemoe-compile would build: integer-dot ones are fixed; the rest are tuned
        layout = weight_layout(cfg, tgt, CompileOptions(target, trunk_bits=int(trunk_bits), group=group), bits)
        funcs = decode_kernels(cfg, bits, group, int(trunk_bits), layout, tgt.tvm())
        store = TuningStore(tgt, store_dir)
        tuned = tune(funcs, tgt, store, retune=retune, progress=_tuning_bar)
    except (ModelImportError, UnknownTargetError, TuningError, ValueError) as e:
        raise click.ClickException(str(e))
    click.echo(f"tuning store {store.path}: {len(tuned)} kernels tuned now")
    click.echo(f"| kernel | lanes | µs | default ({DEFAULT_LANES} lanes) µs |")
    click.echo("|---|---|---|---|")
    for name, func in tunable(funcs).items():
        rec = store.records[kernel_key(name, func)]
        click.echo(f"| {name} | {rec['lanes']} | {rec['us']:.2f} | {rec['default_us']:.2f} |")


def _load_tokenizer(artifact: Path):
    from tokenizers import Tokenizer

    path = artifact / "tokenizer.json"
    if not path.is_file():
        raise click.ClickException(f"{path} not found: pass --tokens with token ids instead of --prompt")
    return Tokenizer.from_file(str(path))


def _storage_emulation(spec: str) -> tuple[float, float]:
    """(bandwidth B/s, latency s) from a target name or "MBPS,MS"."""
    from .targets import UnknownTargetError, load_target

    if "," in spec:
        try:
            mbps, ms = (float(v) for v in spec.split(","))
        except ValueError:
            raise click.UsageError(f"--emulate-storage {spec!r}: give MB/s,ms such as 45,1")
        return mbps * 1e6, ms * 1e-3
    try:
        st = load_target(spec).storage
    except UnknownTargetError as e:
        raise click.UsageError(str(e))
    if not st.get("read_bandwidth_bytes_per_s"):
        raise click.UsageError(f"target {spec!r} describes no storage speed to emulate")
    return float(st["read_bandwidth_bytes_per_s"]), float(st.get("read_latency_s") or 0.0)


@click.command("edgemoe-run")
@click.argument("artifact", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--prompt", help="Text to continue (uses the artifact's tokenizer.json).")
@click.option("--tokens", help="Comma-separated token ids to continue, instead of --prompt.")
@click.option("-n", "n_new", default=64, show_default=True, help="Tokens to generate (greedy).")
@click.option("--budget", type=_Bytes(), default=None,
              help="Memory budget for the runtime (trunk + KV cache + buffers + expert cache), e.g. 24MiB. "
                   "Default: every expert resident.")
@click.option("--cache-fraction", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Instead of --budget: a budget whose expert cache holds this fraction of all experts.")
@click.option("--max-seq", type=int, default=0, help="Context to allocate [artifact maximum].")
@click.option("--no-verify", is_flag=True, help="Skip the CRC-32 check of each expert record read.")
@click.option("--predictor", type=click.Choice(["auto", "none", "path-table", "next-router", "fitted-router", "wrong"]),
              default="auto", show_default=True,
              help="How next-layer experts are predicted for prefetching; auto: fitted-router where the artifact "
                   "was compiled with calibration text, else next-router.")
@click.option("--eviction", type=click.Choice(["auto", "lru", "fifo", "edgemoe"]), default="auto", show_default=True,
              help="auto: edgemoe where the artifact was compiled with calibration text, else lru.")
@click.option("--prefetch", "prefetch_experts", default=0, help="Experts to prefetch per layer [top-k].")
@click.option("--no-loader-thread", is_flag=True, help="Read experts on the decode thread (no prefetching).")
@click.option("--storage", type=click.Choice(["pread", "mmap"]), default="pread", show_default=True)
@click.option("--direct-io", is_flag=True, help="Open the expert image with O_DIRECT (bypass the page cache).")
@click.option("--emulate-storage", metavar="TARGET|MBPS,MS",
              help="Stretch each expert read to a device's speed: a target name (its storage entry) "
                   "or bandwidth in MB/s and latency in ms, e.g. 45,1.")
@click.option("--threads", default=1, show_default=True, help="Compute threads for the kernels' parallel loops "
                                                              "(the loader thread is extra).")
def run_cmd(artifact, prompt, tokens, n_new, budget, cache_fraction, max_seq, no_verify, predictor, eviction,
            prefetch_experts, no_loader_thread, storage, direct_io, emulate_storage, threads):
    """Generate text with a compiled ARTIFACT in the C runtime and report speed, memory and cache behaviour."""
    from .runtime import EdgeMoEError, Session, budget_bytes

    if (prompt is None) == (tokens is None):
        raise click.UsageError("give exactly one of --prompt or --tokens")
    if budget is not None and cache_fraction is not None:
        raise click.UsageError("give --budget or --cache-fraction, not both")
    tok = _load_tokenizer(artifact) if prompt is not None else None
    try:
        ids = tok.encode(prompt).ids if tok else [int(t) for t in tokens.split(",")]
    except ValueError:
        raise click.UsageError(f"--tokens must be comma-separated integers, got {tokens!r}")
    if not ids:
        raise click.UsageError("the prompt encodes to no tokens")
    try:
        if cache_fraction is not None:
            budget = budget_bytes(artifact, max_seq, cache_fraction)
        emulate = _storage_emulation(emulate_storage) if emulate_storage else None
        with Session(artifact, memory_budget=budget or 0, max_seq=max_seq, verify=not no_verify, storage=storage,
                     direct_io=direct_io, emulate=emulate, loader_thread=not no_loader_thread, predictor=predictor,
                     prefetch_experts=prefetch_experts, eviction=eviction, threads=threads) as s:
            t0 = time.perf_counter()
            logits = s.prefill(ids)
            t1 = time.perf_counter()
            out = []
            for _ in range(n_new):
                nxt = int(logits.argmax())
                out.append(nxt)
                if nxt == s.info["eos_token_id"]:
                    break
                logits = s.decode_step(nxt)
            t2 = time.perf_counter()
            st, chosen = s.stats(), (s.info["predictor"], s.info["eviction"])
    except EdgeMoEError as e:
        raise click.ClickException(str(e))
    click.echo((prompt + tok.decode(out)) if tok else ",".join(map(str, out)))
    uses = st["expert_hits"] + st["expert_misses"]
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    click.echo("", err=True)
    click.echo(f"prefill: {len(ids)} tokens in {t1 - t0:.3f} s ({len(ids) / (t1 - t0):.1f} tok/s)", err=True)
    click.echo(f"decode: {len(out)} tokens in {t2 - t1:.3f} s ({len(out) / max(t2 - t1, 1e-9):.1f} tok/s)", err=True)
    click.echo(f"memory: runtime {fmt_bytes(st['memory_bytes'])} (trunk {fmt_bytes(st['trunk_bytes'])}, "
               f"expert cache {st['cache_slots']} slots = {fmt_bytes(st['expert_cache_bytes'])}); "
               f"process peak RSS {fmt_bytes(peak_rss)}", err=True)
    click.echo(f"expert cache: hit rate {st['expert_hits'] / max(uses, 1):.1%} ({st['expert_hits']} hits, "
               f"{st['expert_misses']} misses); read {fmt_bytes(st['bytes_read'] / max(st['tokens'], 1))}/token, "
               f"I/O {st['read_ns'] / 1e6:.1f} ms, stalled {st['stall_ns'] / 1e6:.1f} ms, "
               f"compute {st['compute_ns'] / 1e6:.1f} ms; {chosen[1]} eviction", err=True)
    if st["predicted"]:
        click.echo(f"prediction ({chosen[0]}): {st['predicted_hits'] / st['predicted']:.1%} of chosen experts "
                   f"predicted; prefetches {st['prefetch_issued']} issued, {st['prefetch_used']} used, "
                   f"{st['prefetch_wasted']} evicted or cancelled unused", err=True)


def main():  # pragma: no cover - `python -m edgemoe.cli`
    sys.exit(run_cmd())


@click.command("edgemoe-eval")
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--text", "text_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="Held-out text to score.")
@click.option("--tokens", "n_tokens", default=4096, show_default=True, help="Tokens of the text to score.")
@click.option("--window", default=256, show_default=True, help="Context per window (non-overlapping).")
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
@click.option("--calibration-tokens", default=8192, show_default=True)
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
