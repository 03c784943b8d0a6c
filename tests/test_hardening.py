"""Crafted artifacts and failing storage: every case refused with a message that names it, none
crashes (also under ASan/UBSan), and one transient fault in any storage mode changes no token."""
from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap

import pytest

from edgemoe.compiler import cpu_features
from edgemoe.runtime import REPO_ROOT, EdgeMoEError, Session, budget_bytes

from crafted import copy_artifact, image_cases, image_records, patch_image, patch_trunk, trunk_cases



@pytest.fixture(scope="module")
def tiny(tiny_mixtral_dir, tmp_path_factory, runtime_lib):
    from edgemoe.compiler.driver import CompileOptions, compile_model

    out = tmp_path_factory.mktemp("hardening") / "tiny"
    compile_model(tiny_mixtral_dir, out, CompileOptions(expert_bits=4, max_seq=64), log=lambda m: None)
    return out


@pytest.fixture(scope="module")
def crafted(tiny, tmp_path_factory):
    """name → (artifact directory, the message it must be refused with)."""
    root = tmp_path_factory.mktemp("crafted")
    out = {}
    for i, (name, (how, message)) in enumerate(image_cases(image_records(tiny)).items()):
        patch_image(copy_artifact(tiny, root / f"image{i}"), **how)
        out[name] = (root / f"image{i}", message)
    for i, (name, (how, message)) in enumerate(trunk_cases().items()):
        patch_trunk(copy_artifact(tiny, root / f"trunk{i}"), **how)
        out[name] = (root / f"trunk{i}", message)
    return out


CASES = ["record length near 2^64", "record offset + length wraps", "part beyond what the shape fits",
         "record shorter than its shape", "parts overlapping", "undefined bitwidth", "record out of order", "group zero",
         "alignment zero", "counts far beyond the file", "layers times experts wraps", "image from another compile",
         "undefined INT4 grid",
         "tensor offset wraps", "tensor bytes beyond its shape", "tensor of undefined type",
         "tensor count beyond the file", "zero hidden size", "heads not a multiple of KV heads", "top-k above the experts",
         "undefined header flag", "a float16 KV cache its kernels do not read", "kernels for another architecture",
         "a CPU feature this CPU lacks"]


def test_the_case_list_is_complete(crafted):
    assert sorted(crafted) == sorted(CASES)


@pytest.mark.parametrize("case", CASES)
def test_crafted_artifact_is_refused_naming_the_fault(crafted, case):
    art, message = crafted[case]
    with pytest.raises(EdgeMoEError, match=message) as e:
        with Session(art, loader_thread=False) as s:
            s.prefill([1, 2, 3])
    assert e.value.kind in ("format", "kernel")


def test_every_crafted_case_is_refused_at_the_minimum_budget(crafted, tiny):
    """Where the record table is read, experts are really read too: at the minimum budget every
    step reads; the crafted files must be refused before any read lands in a slot."""
    minimum = budget_bytes(tiny)
    for name, (art, message) in crafted.items():
        with pytest.raises(EdgeMoEError, match=message):
            with Session(art, memory_budget=minimum, storage="mmap") as s:
                s.generate([1, 2, 3], 4)


def test_random_bit_flips_and_truncations_of_kernels_are_refused_before_loading(tiny, tmp_path):
    art = copy_artifact(tiny, tmp_path / "art")
    lib = art / "kernels.so"
    good = lib.read_bytes()
    rnd = random.Random(int.from_bytes(os.urandom(4), "little"))
    for trial in range(40):
        data = bytearray(good)
        if trial < 30:
            at = rnd.randrange(len(data))
            data[at] ^= 1 << rnd.randrange(8)
        else:
            data = data[: rnd.randrange(len(data))]
        lib.write_bytes(bytes(data))
        with pytest.raises(EdgeMoEError, match="does not match the SHA-256") as e:
            Session(art)
        assert e.value.kind == "kernel"
    lib.write_bytes(good)
    with Session(art) as s:
        s.prefill([1, 2, 3])


def test_a_replaced_kernel_library_never_runs_its_code(tiny, tmp_path):
    art = copy_artifact(tiny, tmp_path / "art")
    marker = tmp_path / "constructor-ran"
    src = tmp_path / "evil.c"
    src.write_text(textwrap.dedent(f"""
        #include <stdio.h>
        __attribute__((constructor)) static void run(void) {{ fclose(fopen("{marker}", "w")); }}
    """))
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(art / "kernels.so"), str(src)], check=True)
    with pytest.raises(EdgeMoEError, match="does not match the SHA-256"):
        Session(art)
    assert not marker.exists()


def test_files_of_another_compile_are_refused(tiny_mixtral_dir, tiny, tmp_path):
    from edgemoe.compiler.driver import CompileOptions, compile_model

    other = tmp_path / "other"  # the same model at INT8: other kernels (an identical build would be the same file)
    compile_model(tiny_mixtral_dir, other, CompileOptions(expert_bits=8, max_seq=64), log=lambda m: None)
    for name, message in (("experts.bin", "different compiles"), ("kernels.so", "does not match the SHA-256")):
        art = copy_artifact(tiny, tmp_path / f"mixed-{name}")
        (art / name).write_bytes((other / name).read_bytes())
        with pytest.raises(EdgeMoEError, match=message):
            Session(art)


FIFO_SCRIPT = textwrap.dedent("""
    import sys
    from edgemoe.runtime import Session, EdgeMoEError
    try:
        Session(sys.argv[1])
    except EdgeMoEError as e:
        print(e)
""")


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_a_fifo_or_directory_in_place_of_the_image_is_named(tiny, tmp_path, kind):
    art = copy_artifact(tiny, tmp_path / "art")
    (art / "experts.bin").unlink()
    os.mkfifo(art / "experts.bin") if kind == "fifo" else (art / "experts.bin").mkdir()
    proc = subprocess.run([sys.executable, "-c", FIFO_SCRIPT, str(art)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert ("is not a regular file" if kind == "fifo" else "is a directory") in proc.stdout, proc.stdout


STORAGE_MODES = [dict(storage="pread"), dict(storage="pread", direct_io=True), dict(storage="mmap")]
TRANSIENT = "eio@3,short@9,eintr@15,corrupt@21,delay@27:20"


@pytest.fixture(scope="module")
def plain_tokens(tiny):
    with Session(tiny, loader_thread=False, predictor="none") as s:
        return s.generate([1, 2, 3, 4], 24)


@pytest.mark.parametrize("loader_thread", [True, False], ids=["loader-thread", "inline"])
@pytest.mark.parametrize("mode", STORAGE_MODES, ids=["pread", "direct-io", "mmap"])
def test_one_transient_fault_of_each_kind_changes_no_token(tiny, plain_tokens, mode, loader_thread):
    with Session(tiny, memory_budget=budget_bytes(tiny), loader_thread=loader_thread, inject_faults=TRANSIENT,
                 **mode) as s:
        assert s.generate([1, 2, 3, 4], 24) == plain_tokens
        st = s.stats()
    assert st["bytes_read"] > 0 and st["read_retries"] >= 4, st  # eio, short, eintr and corrupt each read again


@pytest.mark.parametrize("loader_thread", [True, False], ids=["loader-thread", "inline"])
def test_a_step_that_fails_leaves_the_session_usable(tiny, plain_tokens, loader_thread):
    """Reads 10-15 all fail: the steps that need them fail with the cause named, pin nothing, and
    the same step run again once the storage recovers decodes the plain run's tokens. Nothing is
    predicted, so every read is one a step waits for (a failed guess is dropped silently, and on
    the loader thread how many reads guesses take first is a matter of timing)."""
    errors, tokens = [], []

    def step(s, token):  # the same step again until the storage recovers
        for _ in range(8):
            try:
                return s.decode_step(token)
            except EdgeMoEError as e:
                errors.append(str(e))
        raise AssertionError(errors)

    with Session(tiny, memory_budget=budget_bytes(tiny), loader_thread=loader_thread, predictor="none",
                 inject_faults="eio@10*6") as s:
        for token in [1, 2, 3, 4]:
            logits = step(s, token)
        while len(tokens) < 24:
            tokens.append(int(logits.argmax()))
            logits = step(s, tokens[-1])
    assert tokens == plain_tokens
    assert errors and all("Input/output error" in e for e in errors), errors


def test_bad_parameters_are_refused(tiny):
    for kwargs, message in ((dict(emulate=(-1.0, 0.0)), "emulate_bandwidth"),
                            (dict(emulate=(float("nan"), 0.0)), "emulate_bandwidth"),
                            (dict(emulate=(0.0, 0.01)), "emulate_latency needs"),
                            (dict(inject_faults="eio@0"), "fault plan"),
                            (dict(inject_faults="melt@3"), "fault plan")):
        with pytest.raises(EdgeMoEError, match=message):
            Session(tiny, **kwargs)
    for fraction in (float("nan"), -0.5, 1.5):
        with pytest.raises(EdgeMoEError, match="not within"):
            budget_bytes(tiny, 0, fraction)


def test_a_failed_compile_leaves_nothing_and_an_existing_artifact_untouched(tiny_mixtral_dir, tiny, tmp_path,
                                                                             monkeypatch):
    from edgemoe.compiler import lower
    from edgemoe.compiler.driver import CompileOptions, compile_model
    from edgemoe.targets import toolchain

    monkeypatch.setattr(toolchain.shutil, "which", lambda name: None)  # the target's C compiler is missing
    art = copy_artifact(tiny, tmp_path / "art")
    before = {p.name: p.read_bytes() for p in art.iterdir()}
    for out in (tmp_path / "new", art):
        with pytest.raises(lower.ToolchainError, match="not found"):
            compile_model(tiny_mixtral_dir, out, CompileOptions(expert_bits=4, max_seq=64), log=lambda m: None)
    assert not (tmp_path / "new").exists()
    assert {p.name: p.read_bytes() for p in art.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # no working directory left behind
    other = tmp_path / "not-an-artifact"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an EdgeMoE artifact"):
        compile_model(tiny_mixtral_dir, other, CompileOptions(expert_bits=4, max_seq=64), log=lambda m: None)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


def test_the_c_feature_table_is_generated_from_the_python_one():
    header = REPO_ROOT / "runtime_c" / "src" / "generated" / "cpu_features.h"
    assert header.read_text() == cpu_features.c_header(), \
        "regenerate: python -m edgemoe.compiler.cpu_features > runtime_c/src/generated/cpu_features.h"
