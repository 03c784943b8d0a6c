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
    assert "\r" not in r.output and "%|" not in r.output, r.output  # stderr is no terminal here: no bars
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


# ------------------------------------------------------------------------------------------- progress

class RecordingProgress:
    """A progress factory (compiler/progress.py) that records every bar: [desc, total, unit, counted]."""

    def __init__(self):
        self.bars = []

    def __call__(self, iterable, desc=None, total=None, unit="it"):
        bar = [desc, total, unit, 0]
        self.bars.append(bar)

        def counted():
            for item in iterable:
                yield item
                bar[3] += 1
        return counted()


def test_compile_reports_every_long_stage_to_the_progress_factory(tiny_with_tokenizer, tmp_path, monkeypatch,
                                                                  capfd):
    """With a factory, every stage gets a bar that runs to its end (rounding counts each expert);
    without one the compile prints nothing, and the artifact is the same either way."""
    from edgemoe.compiler.driver import CompileOptions, compile_model
    from edgemoe.compiler.expert_image import read_table

    from conftest import CALIBRATION, TRAINED_MODEL

    opts = CompileOptions(calibration=CALIBRATION, calibration_tokens=320, tolerance=0.5, max_bits=3.0,
                          search_text=TRAINED_MODEL / "search.txt", max_seq=64)
    monkeypatch.setenv("EDGEMOE_CACHE_DIR", str(tmp_path / "cache"))  # measure the sensitivities here
    bars = RecordingProgress()
    compile_model(tiny_with_tokenizer, tmp_path / "a", opts, log=lambda m: None, progress=bars)
    names = [b[0] for b in bars.bars]
    for stage in ("importing", "rounding the trunk", "calibration: expert inputs", "bit plans: scoring the float",
                  "bit plans: uniform plans", "sensitivity INT4→INT8", "sensitivity INT4→INT3", "sensitivity INT4→INT2",
                  "bit plans: searching the path", "bit plans: checking", "routing profile", "rounding experts",
                  "lowering", "linking kernels.so", "writing experts.bin"):
        assert any(n.startswith(stage) for n in names), (stage, names)
    assert all(b[1] is not None and b[3] == b[1] for b in bars.bars), bars.bars
    assert [b[1] for b in bars.bars if b[0] == "rounding experts"] == [2 * 4]  # layers × experts
    # the routing profile first: the image's layout follows it (experts often chosen together side by side)
    assert names.index("routing profile") < names.index("rounding experts")

    capfd.readouterr()  # (the silent compile reuses the sensitivities measured above)
    compile_model(tiny_with_tokenizer, tmp_path / "b", opts, log=lambda m: None)
    assert capfd.readouterr() == ("", "")

    a, b = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in "ab")
    assert a["quantization"] == b["quantization"]
    steps = ("steps",)  # they count plan evaluations, fewer where the sensitivities were cached
    assert {k: v for k, v in a["bit_plan_search"].items() if k not in steps} == \
        {k: v for k, v in b["bit_plan_search"].items() if k not in steps}
    start = read_table(tmp_path / "a" / "experts.bin")[0].data_offset
    assert (tmp_path / "a" / "experts.bin").read_bytes()[start:] == (tmp_path / "b" / "experts.bin").read_bytes()[start:]


def test_terminal_progress_draws_only_on_a_terminal(monkeypatch):
    """edgemoe-compile's factory passes items through unchanged; it draws on stderr only when stderr is
    a terminal (so pipes, logs and CliRunner stay clean)."""
    import io

    from edgemoe.compiler.progress import stage, track
    from edgemoe.progressbar import terminal_progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for tty in (False, True):
        err = Terminal() if tty else io.StringIO()
        monkeypatch.setattr("sys.stderr", err)
        assert list(track(terminal_progress, range(5), "counting", unit="thing")) == list(range(5))
        with stage(terminal_progress, "one long call"):
            pass
        drawn = err.getvalue()
        assert ("counting" in drawn and "5/5" in drawn and "one long call" in drawn) == tty, drawn
