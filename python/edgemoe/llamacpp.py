"""llama.cpp as the baseline: convert a model directory to GGUF with llama.cpp's own converter,
quantize it with llama-quantize, and time decoding with llama-bench.

llama.cpp is not a dependency; point these helpers at a built llama.cpp tree:
scripts/fetch-llamacpp.sh puts llama.cpp's source (from the llama-cpp-python sdist) in
build/llama.cpp, builds llama-quantize there and installs the converter's Python requirement.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

# llama.cpp's converter recognises a BPE pre-tokenizer by hashing its output on a probe string and
# knows only published tokenizers. The bundled model's is byte-level BPE with GPT-2's split regex,
# which is what the converter calls "gpt-2"; llama-bench never tokenizes text anyway.
_CONVERT = """
import runpy, sys
tree = sys.argv.pop(1)
sys.path[:0] = [tree, tree + "/gguf-py"]
import conversion.base
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
runpy.run_path(tree + "/convert_hf_to_gguf.py", run_name="__main__")
"""

GGUF_TYPES = {8: "Q8_0", 4: "Q4_0", 3: "Q3_K", 2: "Q2_K"}  # nearest llama.cpp format per expert bitwidth


class LlamaCppError(RuntimeError):
    pass


def tool(tree: Path, name: str) -> Path:
    for p in (tree / "build" / "bin" / name, tree / "bin" / name):
        if p.is_file():
            return p
    raise LlamaCppError(f"{name} not found under {tree}/build/bin: build llama.cpp there first "
                        f"(cmake -B build -DLLAMA_CURL=OFF && cmake --build build --target {name})")


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise LlamaCppError(f"{' '.join(map(str, cmd[:3]))} … failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc.stdout


def check_tree(tree: Path, tools: tuple[str, ...] = ("llama-quantize",)) -> None:
    """Raise LlamaCppError naming what of a llama.cpp tree is missing: its converter, the built
    `tools`, or the converter's Python requirement (sentencepiece, imported for every llama model)."""
    if not (tree / "convert_hf_to_gguf.py").is_file():
        raise LlamaCppError(f"no llama.cpp source tree at {tree} (convert_hf_to_gguf.py missing)")
    for name in tools:
        tool(tree, name)
    if importlib.util.find_spec("sentencepiece") is None:
        raise LlamaCppError("llama.cpp's converter needs the sentencepiece package (pip install sentencepiece)")


def convert(tree: Path, model_dir: Path, out: Path, outtype: str = "f16") -> Path:
    """The model as a GGUF written by the converter itself in `outtype` (f32, f16, bf16, q8_0),
    skipped when `out` exists."""
    if not out.is_file():
        _run([sys.executable, "-c", _CONVERT, str(tree), str(model_dir), "--outtype", outtype, "--outfile", str(out)])
    return out


def quantize(tree: Path, f16: Path, gguf_type: str, pure: bool = False) -> Path:
    """The GGUF `f16` quantized by llama-quantize to `gguf_type` beside it; `pure`: every matrix in that
    type (its --pure: no mixture, e.g. no Q8_0 attention or Q6_K output in a Q4_0 file)."""
    out = f16.with_name(f16.stem.replace("-f16", "") + f"-{gguf_type.lower()}{'-pure' if pure else ''}.gguf")
    if not out.is_file():
        _run([str(tool(tree, "llama-quantize")), *(["--pure"] if pure else []), str(f16), str(out), gguf_type])
    return out


def bench_decode(tree: Path, gguf: Path, n_tokens: int, threads: int, repetitions: int = 5, depth: int = 0) -> float:
    """llama-bench's decode rate (tokens/s) for n_tokens generated after `depth` tokens of context (0: an
    empty one): the best of its repetitions (this machine is shared; the best is the least disturbed)."""
    out = _run([str(tool(tree, "llama-bench")), "-m", str(gguf), "-p", "0", "-n", str(n_tokens),
                "-t", str(threads), "-r", str(repetitions), "-o", "json", *(["-d", str(depth)] if depth else [])])
    return decode_rate(out, n_tokens, gguf)


def bench_prompt(tree: Path, gguf: Path, n_tokens: int, threads: int, repetitions: int = 5) -> float:
    """llama-bench's prompt-processing rate (tokens/s) for a prompt of n_tokens (-p N -n 0), the best of its
    repetitions."""
    out = _run([str(tool(tree, "llama-bench")), "-m", str(gguf), "-p", str(n_tokens), "-n", "0", "-t", str(threads),
                "-r", str(repetitions), "-o", "json"])
    rows = [r for r in json.loads(out) if r.get("n_prompt") == n_tokens and not r.get("n_gen")]
    if not rows:
        raise LlamaCppError(f"llama-bench printed no prompt-processing result for {gguf}")
    return float(max(rows[0].get("samples_ts") or [rows[0]["avg_ts"]]))


def decode_rate(llama_bench_json: str, n_tokens: int, what: object = "the model") -> float:
    """The best decode rate (tokens/s) of the n_tokens-generation rows llama-bench printed as JSON."""
    rows = [r for r in json.loads(llama_bench_json) if r.get("n_gen") == n_tokens]
    if not rows:
        raise LlamaCppError(f"llama-bench printed no decode result for {what}")
    return float(max(rows[0].get("samples_ts") or [rows[0]["avg_ts"]]))


def matvec_us(tree: Path, gguf_type: str, rows: int, cols: int) -> float | None:
    """µs per call of ggml's CPU matrix-vector product of a [rows, cols] `gguf_type` matrix with a
    float32 vector, from llama.cpp's own `test-backend-ops perf` (which also quantizes the vector,
    as ggml does in a model) on half the CPUs (test-backend-ops' fixed choice); None if its perf
    suite has no case of that shape."""
    exe = tool(tree, "test-backend-ops")
    ggml_type = gguf_type.lower().replace("_k", "_K")  # ggml's names: q4_0, q8_0, q2_K
    pattern = f"type_a={ggml_type},type_b=f32,m={rows},n=1,k={cols},"
    out = _run([str(exe), "perf", "-b", "CPU", "-o", "MUL_MAT", "-p", pattern.replace("(", r"\(")])
    for line in out.splitlines():
        if pattern in line and "us/run" in line:
            return float(line.split("us/run")[0].split("-")[-1])
    return None
