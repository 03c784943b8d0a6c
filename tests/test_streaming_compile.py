"""The streaming compile: checkpoints read tensor by tensor, calibration layer by layer, experts
rounded on a process pool and written as they come, an interrupted compile resumed."""
from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgemoe.compiler.driver import CompileOptions, compile_inputs, compile_model, working_directory
from edgemoe.compiler.expert_image import read_experts
from edgemoe.models import load_model
from edgemoe.models.hf_import import TensorReader
from edgemoe.models.stored_tensor import StoredTensor

from conftest import CALIBRATION, TRAINED_MODEL, records


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_stored_tensors_read_as_the_float32_of_what_is_stored(dtype, tmp_path):
    """bf16 / f16 stay as stored until used; used, a tensor is the float32 of the stored values,
    whole, by expert (first index), through arithmetic, and after travelling to another process."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    t = {"fused": torch.randn(3, 5, 8).to(getattr(torch, dtype)), "flat": torch.randn(7).to(getattr(torch, dtype))}
    save_file(t, tmp_path / "model.safetensors")
    r = TensorReader(tmp_path)
    fused, flat = r.get("fused", (3, 5, 8)), r.get("flat", (7,))
    want = t["fused"].float().numpy()
    assert isinstance(fused, StoredTensor) and fused.stored_dtype == {"float32": "F32", "float16": "F16",
                                                                      "bfloat16": "BF16"}[dtype]
    assert np.asarray(fused).dtype == np.float32 and np.array_equal(np.asarray(fused), want)
    assert isinstance(fused[1], StoredTensor) and np.array_equal(np.asarray(fused[2]), want[2])
    assert np.array_equal(fused[1, :2], want[1, :2]) and np.array_equal(fused[-1], want[-1])
    assert np.array_equal(flat * 2, t["flat"].float().numpy() * 2) and np.array_equal(fused.T, want.T)
    assert np.array_equal(np.asarray(pickle.loads(pickle.dumps(fused[0]))), want[0])
    r.done("test")
    with pytest.raises(ValueError, match="'fused' has shape"):
        TensorReader(tmp_path).get("fused", (3, 8, 5))


def test_a_rewritten_checkpoint_is_read_anew(tmp_path):
    """The file mapping a StoredTensor reads through follows the file at its path."""
    import torch
    from safetensors.torch import save_file

    for value, extra in ((1.0, 0), (2.0, 1000)):  # the second file is larger: an old mapping would not reach it
        save_file({"a": torch.full((4, 4), value), "pad": torch.zeros(1 + extra)}, tmp_path / "model.safetensors")
        r = TensorReader(tmp_path)
        assert np.array_equal(np.asarray(r.get("a", (4, 4))), np.full((4, 4), value, np.float32))


def test_the_layer_pass_computes_forward_sequence_s_numbers(trained_model):
    """Layer by layer over all windows, experts one at a time: the same activations, routes and
    outputs, bit for bit, as the whole-sequence pass on each window."""
    from edgemoe.compiler.layer_pass import LayerPass
    from edgemoe.models.reference import forward_sequence

    tokens = np.random.default_rng(3).integers(0, trained_model.config.vocab_size, 300)
    lazy = load_model(TRAINED_MODEL, lazy_experts=True)
    assert isinstance(lazy.layers[0].experts[0].w_gate, StoredTensor)
    calibration = LayerPass(lazy, tokens, window=128)
    traces = []
    for i in range(0, 300, 128):
        traces.append({})
        forward_sequence(trained_model, tokens[i : i + 128], traces[-1])
    for layer in calibration.layers():
        for w, trace in enumerate(traces):
            assert np.array_equal(layer.ffn_in[w], trace["ffn_in"][layer.moe_index])
            assert np.array_equal(layer.logits[w], trace["router_logits"][layer.moe_index])
        calibration.run_experts(layer)
        for w, (out, trace) in enumerate(zip(layer.output(), traces)):
            assert np.array_equal(out, trace["layer_out"][layer.index])


@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss", "qwen2_moe"])
def test_the_layer_pass_follows_each_family_s_forward(family, tmp_path):
    """Dense layers passed through, latent attention, windows and sinks, router bias, expert biases
    and activation, the gated shared expert summed first: the layer pass gives forward_sequence's
    numbers, bit for bit, expert layers indexed as its trace and selected experts index them."""
    from edgemoe.compiler.layer_pass import LayerPass
    from edgemoe.models.reference import forward_sequence

    from families import save_checkpoint

    model_dir = save_checkpoint(family, tmp_path / family)
    eager, lazy = load_model(model_dir), load_model(model_dir, lazy_experts=True)
    tokens = np.random.default_rng(5).integers(0, eager.config.vocab_size, 40)
    traces = [{}, {}]
    selected = [forward_sequence(eager, tokens[i : i + 24], trace)[1] for i, trace in zip((0, 24), traces)]
    calibration = LayerPass(lazy, tokens, window=24)
    seen = []
    for layer in calibration.layers():
        seen.append(layer.index)
        for w, trace in enumerate(traces):
            assert np.array_equal(layer.ffn_in[w], trace["ffn_in"][layer.moe_index])
            assert np.array_equal(layer.logits[w], trace["router_logits"][layer.moe_index])
        calibration.run_experts(layer)
        for out, trace in zip(layer.output(), traces):
            assert np.array_equal(out, trace["layer_out"][layer.index])
    assert seen == eager.config.moe_layer_ids
    assert all(np.array_equal(a, b) for a, b in zip(calibration.selected, selected))


def test_streamed_calibrated_rounding_is_the_in_ram_rounding(tiny_with_tokenizer, tmp_path):
    """Each expert rounded against its own calibration moments, one expert in RAM, on a pool of
    two workers or in this process alike, equals rounding against all moments held at once."""
    from edgemoe.compiler.profile import expert_moments, tokenize_file
    from edgemoe.compiler.quantize import compiled_trunk, quantize

    logs = {}
    for jobs in (1, 2):
        logs[jobs] = []
        compile_model(tiny_with_tokenizer, tmp_path / f"j{jobs}", CompileOptions(
            calibration=CALIBRATION, calibration_tokens=600, max_seq=64, jobs=jobs), log=logs[jobs].append)
    assert records(tmp_path / "j1") == records(tmp_path / "j2")
    assert any("peak RSS" in line and "parameters/s" in line for line in logs[2]), logs[2]
    layout = json.loads((tmp_path / "j1" / "manifest.json").read_text())["quantization"]["layout"]
    model = load_model(tiny_with_tokenizer)
    tokens = tokenize_file(tmp_path / "j1" / "tokenizer.json", CALIBRATION, 600)
    moments = expert_moments(compiled_trunk(model, 8, 32, layout), tokens)
    for li, row in enumerate(read_experts(tmp_path / "j1" / "experts.bin")):
        for ei, got in enumerate(row):
            e = model.layers[li].experts[ei]
            for g, w, gram in zip((got.gate, got.up, got.down), (e.w_gate, e.w_up, e.w_down), moments.grams(li, ei)):
                want = quantize(w, 4, 32, layout, gram)
                assert np.array_equal(g.packed, want.packed) and np.array_equal(g.scales, want.scales), (li, ei)
    assert not list(tmp_path.glob(".*partial"))


def test_a_small_model_is_rounded_in_the_compile_process_unless_told(tiny_mixtral_dir, tmp_path):
    """Starting worker processes costs seconds: where rounding in the compile's own process would take
    less, the compile rounds its experts itself, else on one worker per core; --jobs decides where given."""
    from edgemoe.compiler.expert_pool import POOL_MIN_SECONDS, ROUNDING_RATE, default_jobs

    cores = len(os.sched_getaffinity(0))
    for calibrated in (False, True):
        least = int(POOL_MIN_SECONDS * ROUNDING_RATE[calibrated])
        assert default_jobs(least - 1, calibrated) == 1
        assert default_jobs(least, calibrated) == default_jobs() == cores
    assert default_jobs(int(POOL_MIN_SECONDS * ROUNDING_RATE[True]), calibrated=False) == 1
    for jobs, where in ((None, "1 process"), (2, "2 processes")):
        compile_model(tiny_mixtral_dir, tmp_path / str(jobs), CompileOptions(max_seq=64, jobs=jobs), log=lambda m: None)
        assert json.loads((tmp_path / str(jobs) / "manifest.json").read_text())["experts"]["rounded_on"] == where
    assert records(tmp_path / "None") == records(tmp_path / "2")


def test_a_compile_in_progress_holds_its_output_directory(tiny_mixtral_dir, tmp_path):
    opts = CompileOptions(max_seq=64)
    with working_directory(tmp_path / "a", compile_inputs(tiny_mixtral_dir, opts)):
        with pytest.raises(ValueError, match="another compile is writing"):
            compile_model(tiny_mixtral_dir, tmp_path / "a", opts, log=lambda m: None)
    compile_model(tiny_mixtral_dir, tmp_path / "a", opts, log=lambda m: None)  # released: it compiles
    assert not (tmp_path / "a" / ".inputs").exists()


COMPILE = """
import sys
from pathlib import Path
from edgemoe.compiler.driver import CompileOptions, compile_model
opts = CompileOptions(expert_bits=4, max_seq=256, calibration=Path(sys.argv[3]), calibration_tokens=4096, jobs=1)
compile_model(Path(sys.argv[1]), Path(sys.argv[2]), opts)
"""


def test_a_killed_compile_resumes_from_its_finished_records(artifact_int4, tmp_path):
    """SIGKILL midway through rounding; the same compile again keeps the checked records, rounds
    the rest, and writes the same expert image as a compile never interrupted (conftest's)."""
    out = tmp_path / "resumed"
    journal = tmp_path / f".{out.name}.partial" / ".experts.bin.journal"
    proc = subprocess.Popen([sys.executable, "-c", COMPILE, str(TRAINED_MODEL), str(out), str(CALIBRATION)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    entry = 68  # expert_image.JOURNAL_ENTRY
    try:
        deadline = time.time() + 900
        while time.time() < deadline and proc.poll() is None:
            if journal.is_file() and journal.stat().st_size >= 4 + 32 + 10 * entry:  # inputs digest, 10 records
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the compile ended before it could be interrupted"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert not out.exists() and journal.is_file()
    lines = []
    compile_model(TRAINED_MODEL, out, CompileOptions(expert_bits=4, max_seq=256, calibration=CALIBRATION,
                                                     calibration_tokens=4096), log=lines.append)
    resumed = [line for line in lines if line.startswith("resuming:")]
    assert resumed and 10 <= int(resumed[0].split()[1]) < 48, lines
    assert records(out) == records(artifact_int4)
    assert not journal.parent.exists()
