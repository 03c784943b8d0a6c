"""The C runtime under AddressSanitizer + UBSan and libFuzzer: its unit tests, a decode at the
minimum budget with injected read faults, every crafted artifact, and each fuzz harness over its
committed seed corpus and for a short run. (One hour per harness is run outside CI: the
command is in docs/BENCHMARKS.md.)"""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from edgemoe.runtime import REPO_ROOT, budget_bytes, build_runtime

from crafted import copy_artifact, image_cases, image_records, patch_image, patch_trunk, trunk_cases
from fuzz_corpus import build_corpus_model

SANITIZER_ENV = {**os.environ, "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0",
                 "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1"}
CORPUS = REPO_ROOT / "runtime_c" / "fuzz" / "corpus"
FUZZ_SECONDS = int(os.environ.get("EDGEMOE_FUZZ_SECONDS", "15"))


def _clean(proc):
    report = proc.stderr
    assert "AddressSanitizer" not in report and "runtime error:" not in report and "LeakSanitizer" not in report, report


@pytest.fixture(scope="module")
def asan_build():
    return build_runtime(REPO_ROOT / "build" / "asan", sanitize="address,undefined").parent


@pytest.fixture(scope="module")
def corpus_artifact(tmp_path_factory, runtime_lib):
    return build_corpus_model(tmp_path_factory.mktemp("fuzz_model"))


def test_unit_tests_under_asan_and_ubsan(asan_build):
    proc = subprocess.run(["ctest", "--output-on-failure"], cwd=asan_build, capture_output=True, text=True,
                          env=SANITIZER_ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _clean(proc)


def assert_each_fault_read_again(stdout, faults, threaded):
    """Each planned fault fails (or damages) one storage request, and every record of a failed request is
    read again on its own. Inline, the requests are the same in every run, so each fault costs one record;
    with the loader thread, whether a prefetch and a demand read went out as one request depends on timing,
    so a fault may cost each record of the request it hit."""
    stats = dict(line.split("=", 1) for line in stdout.splitlines()[1:] if "=" in line)
    retries, requests, records = (int(stats[k]) for k in ("read_retries", "read_requests", "records_read"))
    if threaded:
        assert retries >= faults, stdout
    else:
        assert retries == faults, stdout
    assert requests <= records + retries, stdout  # each retry a request of its own, runs coalesced or not


@pytest.mark.parametrize("flags", [[], ["--no-loader-thread"], ["--mmap"], ["--direct-io", "--no-loader-thread"]],
                         ids=["pread", "inline", "mmap", "direct-io-inline"])
def test_decode_with_injected_faults_under_asan_and_ubsan(asan_build, artifact_int4, flags):
    run = lambda *extra: subprocess.run(  # noqa: E731
        [str(asan_build / "edgemoe_run"), str(artifact_int4), "--tokens", "1,464,2170", "-n", "24", "--budget",
         str(budget_bytes(artifact_int4)), *flags, *extra], capture_output=True, text=True, timeout=300,
        env=SANITIZER_ENV)
    plain, faulty = run(), run("--inject-faults", "eio@5,short@17,eintr@29,corrupt@41,delay@53:10")
    for proc in (plain, faulty):
        assert proc.returncode == 0, proc.stderr
        _clean(proc)
    assert faulty.stdout.splitlines()[0] == plain.stdout.splitlines()[0]
    assert_each_fault_read_again(faulty.stdout, faults=4, threaded="--no-loader-thread" not in flags)


def test_crafted_artifacts_are_refused_under_asan_and_ubsan(asan_build, corpus_artifact, tmp_path):
    cases = [("image", how, message) for how, message in image_cases(image_records(corpus_artifact)).values()] + \
            [("trunk", how, message) for how, message in trunk_cases().values()]
    budget = str(budget_bytes(corpus_artifact))
    for i, (kind, how, message) in enumerate(cases):
        art = copy_artifact(corpus_artifact, tmp_path / f"case{i}")
        (patch_image if kind == "image" else patch_trunk)(art, **how)
        proc = subprocess.run([str(asan_build / "edgemoe_run"), str(art), "--tokens", "1,2,3", "-n", "4", "--budget",
                               budget], capture_output=True, text=True, timeout=120, env=SANITIZER_ENV)
        assert proc.returncode == 1 and message in proc.stderr, (how, proc.stderr)
        _clean(proc)


@pytest.fixture(scope="module")
def fuzz_build():
    if shutil.which("clang") is None:
        pytest.fail("the fuzz harnesses need clang and libclang-rt (scripts/setup-dev.sh installs them)")
    build = REPO_ROOT / "build" / "fuzz"
    for cmd in (["cmake", "-S", str(REPO_ROOT), "-B", str(build), "-DEM_FUZZ=ON", "-DCMAKE_C_COMPILER=clang",
                 "-DCMAKE_BUILD_TYPE=Debug"],
                ["cmake", "--build", str(build), "-j", "2", "--target", "fuzz_image", "fuzz_trunk", "fuzz_session"]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return build


@pytest.mark.parametrize("harness,seeds", [("image", "image"), ("trunk", "trunk"), ("session", "image")])
def test_fuzz_harness_over_its_corpus_then_briefly(fuzz_build, corpus_artifact, tmp_path, harness, seeds):
    env = {**SANITIZER_ENV, "EM_FUZZ_ARTIFACT": str(corpus_artifact)}
    exe = str(fuzz_build / f"fuzz_{harness}")
    files = sorted(str(p) for p in (CORPUS / seeds).iterdir())
    regression = subprocess.run([exe, *files], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert regression.returncode == 0, regression.stderr[-4000:]
    fresh = tmp_path / "new"
    fresh.mkdir()
    run = subprocess.run([exe, f"-max_total_time={FUZZ_SECONDS}", "-timeout=20", "-rss_limit_mb=4096", str(fresh),
                          str(CORPUS / seeds)], capture_output=True, text=True, timeout=FUZZ_SECONDS + 300, env=env,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "Done" in run.stderr


def test_encoder_decoder_with_injected_faults_under_asan_and_ubsan(asan_build, tmp_path):
    """Switch Transformers' encoder (at prefill, over the prompt) and decoder, with expert reads
    failing and retried, at the minimum budget: no sanitizer report, the same tokens as without faults."""
    from families import SWITCH_VARIED, save_switch_checkpoint

    from edgemoe.compiler.driver import CompileOptions, compile_model

    art = tmp_path / "art"
    compile_model(save_switch_checkpoint(tmp_path / "model", **SWITCH_VARIED), art,
                  CompileOptions(expert_bits=4, max_seq=64), log=lambda m: None)
    run = lambda *extra: subprocess.run(  # noqa: E731
        [str(asan_build / "edgemoe_run"), str(art), "--tokens", "1,17,42,99,5,33,21,8", "-n", "24", "--budget",
         str(budget_bytes(art)), *extra], capture_output=True, text=True, timeout=300, env=SANITIZER_ENV)
    plain, faulty = run(), run("--inject-faults", "eio@5,short@17,corrupt@41")
    for proc in (plain, faulty):
        assert proc.returncode == 0, proc.stderr
        _clean(proc)
    assert faulty.stdout.splitlines()[0] == plain.stdout.splitlines()[0]
    assert_each_fault_read_again(faulty.stdout, faults=3, threaded=True)


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_latent_attention_dense_layers_and_grouped_routing_under_asan_and_ubsan(asan_build, tmp_path, family):
    """The MLA_ATTENTION and DENSE_FFN ops and the grouped routing decode cleanly at the minimum
    budget, with the same tokens as the plain build."""
    from families import save_checkpoint

    from edgemoe.compiler.driver import CompileOptions, compile_model

    art = tmp_path / "art"
    compile_model(save_checkpoint(family, tmp_path / "model"), art, CompileOptions(expert_bits=4, max_seq=64),
                  log=lambda m: None)
    run = lambda build: subprocess.run(  # noqa: E731
        [str(build / "edgemoe_run"), str(art), "--tokens", "1,17,42", "-n", "24", "--budget", str(budget_bytes(art))],
        capture_output=True, text=True, timeout=300, env=SANITIZER_ENV)
    checked, plain = run(asan_build), run(build_runtime().parent)
    assert checked.returncode == 0 and plain.returncode == 0, checked.stderr + plain.stderr
    _clean(checked)
    assert checked.stdout.splitlines()[0] == plain.stdout.splitlines()[0]
