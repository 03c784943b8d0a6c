"""Every number the command-line tools take is checked: a bad one is a usage error (exit 2) that
names the option and what it accepts; nothing silently means something else."""
import re
import subprocess

import pytest
from click.testing import CliRunner

from edgemoe.bench import bench_cmd
from edgemoe.cli import compile_cmd, eval_cmd, run_cmd, tune_cmd
from edgemoe.runtime import DEFAULT_BUILD_DIR, budget_bytes
from edgemoe.units import parse_bytes


@pytest.fixture(scope="module")
def edgemoe_run(runtime_lib):
    """The C tool, built with the runtime (runtime.build_runtime builds every CMake target)."""
    path = DEFAULT_BUILD_DIR / "edgemoe_run"
    assert path.is_file(), f"{path} was not built"
    return path


@pytest.fixture(scope="module")
def tiny_artifact(tiny_mixtral_dir, tmp_path_factory, runtime_lib):
    """The random test model compiled without calibration text (no routing profile) and without a
    tokenizer: vocabulary 160, 4 experts per layer, context 64."""
    from edgemoe.compiler.driver import CompileOptions, compile_model

    out = tmp_path_factory.mktemp("validation_int4")
    compile_model(tiny_mixtral_dir, out, CompileOptions(expert_bits=4, max_seq=64), log=lambda m: None)
    return out


def c_run(tool, *args):
    return subprocess.run([str(tool), *map(str, args)], capture_output=True, text=True, timeout=60)


# ---------------------------------------------------------------------------------------------- C CLI

C_BAD = [
    (["--budget", "abc"], "--budget"),
    (["--budget", "-1"], "--budget"),
    (["--budget", "99999999999999999999"], "--budget"),  # past 2^64
    (["--budget", "17179869184GiB"], "--budget"),  # 2^64 bytes
    (["--budget", "5000000x"], "--budget"),
    (["--budget", "0.5"], "--budget"),  # not a whole byte
    (["--budget", "0"], "--budget"),  # 0 would mean unlimited
    (["--budget", "5."], "--budget"),
    (["-n", "-5"], "-n"),
    (["-n", "1.5"], "-n"),
    (["-n", "2147483648"], "-n"),
    (["-n", ""], "-n"),
    (["--emulate", "0,0"], "--emulate"),
    (["--emulate", "-45,1"], "--emulate"),
    (["--emulate", "45,-1"], "--emulate"),
    (["--emulate", "nan,1"], "--emulate"),
    (["--emulate", "45,inf"], "--emulate"),
    (["--emulate", "45"], "--emulate"),
    (["--emulate", "45,1,2"], "--emulate"),
    (["--emulate", "45x,1"], "--emulate"),
    (["--emulate", "1." + "0" * 200 + "x,1"], "--emulate"),
    (["--emulate-compute", "4,48"], "--emulate-compute"),
    (["--emulate-compute", "4,48,24,1"], "--emulate-compute"),
    (["--emulate-compute", "0,48,24"], "--emulate-compute"),
    (["--emulate-compute", "4,nan,24"], "--emulate-compute"),
    (["--emulate-compute", "4,48,-1"], "--emulate-compute"),
    (["--tokens", "4294967396"], "--tokens"),  # would wrap to token 100
    (["--tokens", "2147483648"], "--tokens"),
    (["--tokens", "1,-2"], "--tokens"),
    (["--tokens", "1,,2"], "--tokens"),
    (["--tokens", "1,2,"], "--tokens"),
    (["--tokens", "1,2x"], "--tokens"),
    (["--tokens", ",".join(["1"] * 4097)], "--tokens"),  # more than the prompt holds: not truncated
    (["--max-seq", "-1"], "--max-seq"),
    (["--max-seq", "4294967296"], "--max-seq"),
    (["--max-seq", "12abc"], "--max-seq"),
    (["--threads", "0"], "--threads"),
    (["--threads", "1025"], "--threads"),
    (["--threads", "-1"], "--threads"),
    (["--prefetch-layers", "0"], "--prefetch-layers"),
    (["--prefetch-layers", "5"], "--prefetch-layers"),
    (["--prefill-tokens", "0"], "--prefill-tokens"),
    (["--prefill-tokens", "1025"], "--prefill-tokens"),
    (["--predictor", "psychic"], "--predictor"),
    (["--eviction", "random"], "--eviction"),
    (["--budget"], "--budget"),  # no value
    (["--frobnicate"], "--frobnicate"),
]


@pytest.mark.parametrize("args,option", C_BAD, ids=[" ".join(a)[:40] for a, _ in C_BAD])
def test_c_cli_refuses_bad_numbers_before_opening_the_artifact(edgemoe_run, tmp_path, args, option):
    """Exit 2 naming the option, without touching the (missing) artifact."""
    base = [] if args[0] == "--tokens" else ["--tokens", "1,2,3"]
    proc = c_run(edgemoe_run, tmp_path / "no-artifact", *base, *args)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert option in proc.stderr and "trunk.bin" not in proc.stderr, proc.stderr


def test_c_cli_names_the_bad_token_and_the_range(edgemoe_run, tmp_path):
    proc = c_run(edgemoe_run, tmp_path, "--tokens", "1,2,4294967396")
    assert proc.returncode == 2
    assert "element 3 ('4294967396')" in proc.stderr and "2147483647" in proc.stderr, proc.stderr
    proc = c_run(edgemoe_run, tmp_path, "--tokens", "1", "--threads", "0")
    assert "[1, 1024]" in proc.stderr, proc.stderr


def test_c_cli_help_and_missing_arguments(edgemoe_run, tmp_path):
    proc = c_run(edgemoe_run, "--help")
    assert proc.returncode == 0 and "--budget SIZE" in proc.stdout and "--emulate MBPS,MS" in proc.stdout
    for args in ([], [tmp_path], ["--tokens", "1"], [tmp_path, tmp_path, "--tokens", "1"]):
        proc = c_run(edgemoe_run, *args)
        assert proc.returncode == 2 and proc.stderr.startswith("edgemoe_run: "), (args, proc.stderr)


def test_c_cli_accepts_good_numbers_then_opens_the_artifact(edgemoe_run, tmp_path):
    """Valid arguments get as far as em_open, which fails on the missing artifact: exit 1."""
    proc = c_run(edgemoe_run, tmp_path / "no-artifact", "--tokens", " 1, 2 ,0", "-n", "0", "--budget", "1.5GB",
                 "--max-seq", "0", "--emulate", "45,0", "--threads", "1024", "--predictor", "none",
                 "--eviction", "fifo")
    assert proc.returncode == 1, proc.stderr
    assert "trunk.bin" in proc.stderr, proc.stderr


SIZES = ["1", "12000000", "7B", " 7 kb ", "1.5KB", "0.5KiB", "5.6KiB", ".25KiB", "1.0009765625KiB", "3kib", "2.7Kb",
         "1.5", "0.5", "0", "0KiB", "0.0001KB", "-1", "5.", "5000000x", "1e3", "1 2", "KiB", "", "1.5TB",
         "18446744073709551615", "18446744073709551616", "17179869183.999999999GiB", "17179869184GiB"]


@pytest.mark.parametrize("text", SIZES)
def test_c_and_python_read_budgets_alike(edgemoe_run, tmp_path, text):
    """--budget is accepted or refused by the C tool exactly where units.parse_bytes (with the
    Python CLI's at-least-one-byte, at-most-2^64-1 rule) accepts or refuses it."""
    try:
        n = parse_bytes(text)
        ok = 1 <= n < 2**64
    except ValueError:
        ok = False
    proc = c_run(edgemoe_run, tmp_path / "no-artifact", "--tokens", "1", "--budget", text)
    assert proc.returncode == (1 if ok else 2), (text, proc.stderr)
    r = CliRunner().invoke(run_cmd, [str(tmp_path), "--tokens", "1", "--budget", text])
    if not ok:
        assert r.exit_code == 2 and "--budget" in r.output, r.output


def test_c_and_python_budgets_are_the_same_bytes(edgemoe_run, tiny_artifact):
    """Below the artifact's minimum, the runtime's refusal names the bytes the C tool read."""
    minimum = budget_bytes(tiny_artifact, 0, 0.0)
    texts = ["1", "7B", " 7 kb ", "1.5KB", "0.5KiB", "5.6KiB", ".25KiB", "2.7Kb", "1.0009765625KiB", "0.0001MB"]
    for text in texts:
        n = parse_bytes(text)
        assert 1 <= n < minimum
        proc = c_run(edgemoe_run, tiny_artifact, "--tokens", "1", "--budget", text)
        assert proc.returncode == 1, proc.stderr
        assert re.search(rf"\b{n} bytes", proc.stderr), (text, n, proc.stderr)


def test_c_cli_checks_the_context_against_the_artifact(edgemoe_run, tiny_artifact):
    proc = c_run(edgemoe_run, tiny_artifact, "--tokens", "1,2,3", "-n", "62")  # 65 positions, context 64
    assert proc.returncode == 2 and "-n" in proc.stderr and "[0, 61]" in proc.stderr, proc.stderr
    proc = c_run(edgemoe_run, tiny_artifact, "--tokens", "1,2,3", "-n", "4", "--max-seq", "65")
    assert proc.returncode == 2 and "--max-seq" in proc.stderr and "64" in proc.stderr, proc.stderr
    proc = c_run(edgemoe_run, tiny_artifact, "--tokens", "1,2,160", "-n", "2")  # vocabulary 160: the runtime's check
    assert proc.returncode == 1 and "160" in proc.stderr, proc.stderr
    proc = c_run(edgemoe_run, tiny_artifact, "--tokens", "1,2,3", "-n", "61", "--budget", "64MiB", "--emulate",
                 "1000,0", "--threads", "2", "--ignore-eos")  # the whole context, past any end-of-sequence token
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines[0].split(",")) == 61
    stats = dict(line.split("=") for line in lines[1:])
    assert int(stats["memory_bytes"]) <= 64 << 20


# ----------------------------------------------------------------------------------------- Python CLI

PY_RUN_BAD = [
    (["--budget", "0.5"], "--budget"),
    (["--budget", "0"], "--budget"),
    (["--budget", "-1"], "--budget"),
    (["--budget", "5000000x"], "--budget"),
    (["--budget", "18446744073709551616"], "--budget"),
    (["--cache-fraction", "nan"], "--cache-fraction"),
    (["--cache-fraction", "inf"], "--cache-fraction"),
    (["--cache-fraction", "1.5"], "--cache-fraction"),
    (["--cache-fraction", "-0.1"], "--cache-fraction"),
    (["--tokens", "4294967396"], "--tokens"),
    (["--tokens", "1,-2"], "--tokens"),
    (["--tokens", "1,,2"], "--tokens"),
    (["--tokens", "1.5"], "--tokens"),
    (["-n", "-5"], "-n"),
    (["-n", "2147483648"], "-n"),
    (["--threads", "0"], "--threads"),
    (["--threads", "1025"], "--threads"),
    (["--max-seq", "-1"], "--max-seq"),
    (["--max-seq", "4294967296"], "--max-seq"),
    (["--prefetch", "-1"], "--prefetch"),
    (["--prefetch-layers", "0"], "--prefetch-layers"),
    (["--prefetch-layers", "5"], "--prefetch-layers"),
    (["--prefill-tokens", "0"], "--prefill-tokens"),
    (["--prefill-tokens", "1025"], "--prefill-tokens"),
    (["--emulate-storage", "0,0"], "--emulate-storage"),
    (["--emulate-storage", "-45,1"], "--emulate-storage"),
    (["--emulate-storage", "45,-1"], "--emulate-storage"),
    (["--emulate-storage", "45,nan"], "--emulate-storage"),
    (["--emulate-storage", "45,1,2"], "--emulate-storage"),
    (["--emulate-storage", "no-such-board"], "--emulate-storage"),
    (["--emulate-compute", "4,48"], "--emulate-compute"),
    (["--emulate-compute", "4,0,24"], "--emulate-compute"),
    (["--emulate-compute", "4,48,inf"], "--emulate-compute"),
    (["--emulate-compute", "no-such-board"], "--emulate-compute"),
]


@pytest.mark.parametrize("args,option", PY_RUN_BAD, ids=[" ".join(a) for a, _ in PY_RUN_BAD])
def test_run_refuses_bad_numbers_naming_the_option(tmp_path, args, option):
    base = [] if args[0] == "--tokens" else ["--tokens", "1,2,3"]
    r = CliRunner().invoke(run_cmd, [str(tmp_path), *base, *args])
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    assert option in r.output, r.output


def test_run_names_the_bad_token(tmp_path):
    r = CliRunner().invoke(run_cmd, [str(tmp_path), "--tokens", "1, 2,4294967396"])
    assert r.exit_code == 2 and "element 3 ('4294967396')" in r.output and "2147483647" in r.output, r.output


def test_run_checks_numbers_against_the_artifact(tiny_artifact):
    for args, option in [(["-n", "62"], "-n"), (["--max-seq", "65"], "--max-seq"), (["--prefetch", "5"], "--prefetch")]:
        r = CliRunner().invoke(run_cmd, [str(tiny_artifact), "--tokens", "1,2,3", "-n", "4", *args])
        assert r.exit_code == 2 and option in r.output, (args, r.output)
    r = CliRunner().invoke(run_cmd, [str(tiny_artifact), "--tokens", "1,2,3", "-n", "61", "--budget", "0.0625GiB"])
    assert r.exit_code == 0 and "decode: " in r.output, r.output  # up to 61 tokens (it stops at EOS)
    r = CliRunner().invoke(run_cmd, [str(tiny_artifact), "--tokens", "1,2,3", "-n", "2", "--cache-fraction", "0"])
    assert r.exit_code == 0, r.output  # the minimum budget


PY_COMPILE_BAD = [
    (["--tolerance", "nan"], "--tolerance"),
    (["--tolerance", "0"], "--tolerance"),
    (["--tolerance", "100%"], "--tolerance"),
    (["--tolerance", "abc"], "--tolerance"),
    (["--max-bits", "nan"], "--max-bits"),
    (["--max-bits", "inf"], "--max-bits"),
    (["--max-bits", "1.5"], "--max-bits"),
    (["--max-bits", "9"], "--max-bits"),
    (["--group", "0"], "--group"),
    (["--group", "-32"], "--group"),
    (["--max-seq", "0"], "--max-seq"),
    (["--max-seq", "-5"], "--max-seq"),
    (["--max-seq", "129"], "--max-seq"),  # the test model's maximum is 128
    (["--calibration-tokens", "0"], "--calibration-tokens"),
]


@pytest.mark.parametrize("args,option", PY_COMPILE_BAD, ids=[" ".join(a) for a, _ in PY_COMPILE_BAD])
def test_compile_refuses_bad_numbers_naming_the_option(tiny_mixtral_dir, tmp_path, args, option):
    r = CliRunner().invoke(compile_cmd, [str(tiny_mixtral_dir), "-o", str(tmp_path / "out"), *args])
    assert r.exit_code == 2 and option in r.output, (r.exit_code, r.output, r.exception)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,option", [(["--bits", "5"], "--bits"), (["--bits", "4,x"], "--bits"),
                                         (["--group", "0"], "--group"), (["--rounds", "0"], "--rounds")])
def test_tune_refuses_bad_numbers(tiny_mixtral_dir, args, option):
    r = CliRunner().invoke(tune_cmd, [str(tiny_mixtral_dir), *args])
    assert r.exit_code == 2 and option in r.output, r.output


@pytest.mark.parametrize("args,option", [(["--window", "1"], "--window"), (["--tokens", "0"], "--tokens"),
                                         (["--calibration-tokens", "-1"], "--calibration-tokens")])
def test_eval_refuses_bad_numbers(tiny_mixtral_dir, tmp_path, args, option):
    text = tmp_path / "t.txt"
    text.write_text("some text")
    r = CliRunner().invoke(eval_cmd, [str(tiny_mixtral_dir), "--text", str(text), *args])
    assert r.exit_code == 2 and option in r.output, r.output


@pytest.mark.parametrize("text,n", [("12000000", 12000000), ("5.6MiB", 5872025), ("1.5GB", 1500000000),
                                    ("1.5KiB", 1536), (" 7 kb ", 7000), ("18446744073709551615", 2**64 - 1),
                                    ("0.1KiB", 102), ("1.000000000000000001GB", 10**9)])
def test_parse_bytes_is_exact(text, n):
    assert parse_bytes(text) == n


@pytest.mark.parametrize("text", ["0.5", "1.5B", "-1", "5.", "1e3", "5000000x", "", "1.5TB"])
def test_parse_bytes_refuses(text):
    with pytest.raises(ValueError):
        parse_bytes(text)


# -------------------------------------------------------------------------------------------- bench

def test_bench_pipeline_without_tokenizer_says_what_to_do(tiny_artifact):
    r = CliRunner().invoke(bench_cmd, ["pipeline", str(tiny_artifact), "--max-seq", "32", "-n", "2"])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.exception
    assert "tokenizer.json not found" in r.output and "--tokens" in r.output, r.output


def test_bench_pipeline_without_profile_skips_those_rows_with_a_note(tiny_artifact, tmp_path):
    import json

    out = tmp_path / "pipeline.json"
    r = CliRunner().invoke(bench_cmd, ["pipeline", str(tiny_artifact), "--tokens", "1,2,3", "-n", "3", "--max-seq",
                                       "32", "--emulate-storage", "2000,0", "--json-out", str(out), "--plot",
                                       str(tmp_path / "pipeline.png")])
    assert r.exit_code == 0, (r.output, r.exception)
    assert "compiled without calibration text" in r.output and "--calibration" in r.output, r.output
    saved = json.loads(out.read_text())
    ran, skipped = [x["config"] for x in saved["results"]], saved["skipped"]
    assert len(ran) == 4 and len(skipped) == 5, (ran, skipped)
    assert not any("EdgeMoE" in c or "path-table" in c or "fitted-router" in c for c in ran)
    assert all(x["tokens"] == saved["results"][0]["tokens"] for x in saved["results"])


def test_bench_checks_numbers_and_the_profile(tiny_artifact):
    for args, option in [(["--fraction", "nan"], "--fraction"), (["-n", "0"], "-n"),
                         (["--emulate-storage", "0,1"], "--emulate-storage"), (["--tokens", "1,-1"], "--tokens"),
                         (["--max-seq", "65"], "--max-seq"), (["-n", "40"], "-n"),
                         (["--prefetch-margin", "0"], "--prefetch-margin"),
                         (["--prefetch-margin", "nan"], "--prefetch-margin")]:
        r = CliRunner().invoke(bench_cmd, ["pipeline", str(tiny_artifact), "--tokens", "1,2,3", "--max-seq", "32",
                                           *args])
        assert r.exit_code == 2 and option in r.output, (args, r.output)
    r = CliRunner().invoke(bench_cmd, ["budget", str(tiny_artifact), "--budget", "8MiB", "--tokens", "1,2",
                                       "--max-seq", "32", "-n", "2", "--eviction", "edgemoe"])
    assert r.exit_code == 1 and "compiled without calibration text" in r.output, r.output
    r = CliRunner().invoke(bench_cmd, ["budget", str(tiny_artifact), "--budget", "0.5"])
    assert r.exit_code == 2 and "--budget" in r.output, r.output


def test_bench_llamacpp_names_a_depth_the_artifact_cannot_hold(tiny_mixtral_dir, tiny_artifact, tmp_path):
    """Checked before llama.cpp converts anything: the tree is never looked into."""
    r = CliRunner().invoke(bench_cmd, ["llamacpp", str(tiny_mixtral_dir), str(tiny_artifact), "--llama-cpp",
                                       str(tmp_path), "--depth", "60", "-n", "8"])
    assert r.exit_code == 2 and "--depth" in r.output and "at most 64" in r.output and "--max-seq 68" in r.output, \
        r.output
    r = CliRunner().invoke(bench_cmd, ["llamacpp", str(tiny_mixtral_dir), str(tiny_artifact), "--llama-cpp",
                                       str(tmp_path), "--depth", "-1"])
    assert r.exit_code == 2 and "--depth" in r.output, r.output
    r = CliRunner().invoke(bench_cmd, ["llamacpp", str(tiny_mixtral_dir), str(tiny_artifact), "--llama-cpp",
                                       str(tmp_path), "--prompt-tokens", "65"])
    assert r.exit_code == 2 and "--prompt-tokens" in r.output and "maximum context" in r.output, r.output


def test_bench_predictors_without_tokenizer_says_so(tiny_artifact, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("held-out text")
    r = CliRunner().invoke(bench_cmd, ["predictors", str(tiny_artifact), "--text", str(text), "--window", "32"])
    assert r.exit_code == 1 and "tokenizer.json not found" in r.output, (r.output, r.exception)
    r = CliRunner().invoke(bench_cmd, ["predictors", str(tiny_artifact), "--text", str(text), "--prefetch", "1,-1"])
    assert r.exit_code == 2 and "--prefetch" in r.output, r.output


def test_compile_refuses_a_coactivation_layout_without_calibration_text(tiny_mixtral_dir, tmp_path):
    """The co-activation layout comes from routing on calibration text: without it the compile stops
    before writing anything, naming both ways out."""
    r = CliRunner().invoke(compile_cmd, [str(tiny_mixtral_dir), "-o", str(tmp_path / "out"), "--expert-order",
                                         "coactivation"])
    assert r.exit_code != 0 and "--calibration" in r.output and "--expert-order index" in r.output, r.output
    assert not (tmp_path / "out").exists()
