"""The command-line tools on the random test model: what a user types, what they read back."""
import json

import pytest
from click.testing import CliRunner

from edgemoe.cli import compile_cmd, eval_cmd, run_cmd


@pytest.fixture(scope="module")
def compiled(tiny_mixtral_dir, tmp_path_factory, runtime_lib):
    out = tmp_path_factory.mktemp("cli_int4")
    r = CliRunner().invoke(compile_cmd, [str(tiny_mixtral_dir), "-o", str(out), "--bits", "4", "--max-seq", "64"])
    assert r.exit_code == 0, r.output
    return out


def test_compile_writes_a_manifest_naming_its_choices(compiled):
    q = json.loads((compiled / "manifest.json").read_text())["quantization"]
    assert q["expert_bits"] == 4 and q["trunk_bits"] == 8 and q["layout"] in ("rows", "tiles")


@pytest.mark.parametrize("args,message", [
    (["--target", "no-such-board"], "unknown target 'no-such-board'"),
    (["--bits", "16", "--int-dot"], "float16 experts have no tiles layout"),
    (["--trunk-bits", "3"], "Invalid value for '--trunk-bits'"),
])
def test_compile_refuses_bad_options_naming_them(tiny_mixtral_dir, tmp_path, args, message):
    r = CliRunner().invoke(compile_cmd, [str(tiny_mixtral_dir), "-o", str(tmp_path / "out"), *args])
    assert r.exit_code != 0 and message in r.output, r.output


def test_int_dot_is_refused_where_the_target_has_no_dot_product(tiny_mixtral_dir):
    """A baseline x86-64 CPU (SSE2, no AVX2): the float kernels are chosen, and asking for the
    integer-dot ones is an error that says why."""
    from edgemoe.compiler.driver import CompileOptions, weight_layout
    from edgemoe.models import load_model
    from edgemoe.targets import TargetDesc

    old = TargetDesc("x86-64-v1", "SSE2 only", {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64"},
                     "linux", "cc", "shared", None, {})
    cfg = load_model(tiny_mixtral_dir).config
    assert weight_layout(cfg, old, CompileOptions(), [4]) == "rows"
    with pytest.raises(ValueError, match="target x86-64-v1 has none of avx512vnni, dotprod, neon, avx2"):
        weight_layout(cfg, old, CompileOptions(int_dot=True), [4])


def test_run_reports_speed_memory_and_cache(compiled):
    r = CliRunner().invoke(run_cmd, [str(compiled), "--tokens", "1,2,3", "-n", "8", "--cache-fraction", "0.5"])
    assert r.exit_code == 0, r.output
    assert "decode: 8 tokens" in r.output and "expert cache: hit rate" in r.output


def test_eval_needs_the_tokenizer_and_scores_an_artifact(compiled, artifact_int4, tmp_path):
    text = tmp_path / "held_out.txt"
    text.write_text("The history of the city begins in the river valley, where the first houses stood. " * 12)
    r = CliRunner().invoke(eval_cmd, [str(compiled), "--text", str(text)])
    assert r.exit_code != 0 and "tokenizer.json not found" in r.output, r.output
    r = CliRunner().invoke(eval_cmd, [str(artifact_int4), "--text", str(text), "--tokens", "96", "--window", "48"])
    assert r.exit_code == 0 and "(C runtime): perplexity" in r.output, r.output
