"""The Arm path end to end on this x86 machine: kernels compiled by TVM for Raspberry Pi 4
(Cortex-A72, Armv8.0: integer-dot kernels from widening multiplies, and the float-dequantizing
kernels) and Raspberry Pi 5 (Cortex-A76: `sdot` integer-dot kernels), the C runtime
cross-compiled with aarch64-linux-gnu-gcc, run under qemu-user, against the NumPy reference of
the same artifact."""
import json
import subprocess

import pytest

from edgemoe.compiler.driver import CompileOptions, compile_model
from edgemoe.compiler.artifact_reference import artifact_model
from edgemoe.models.reference import ReferenceExecutor
from edgemoe.runtime import REPO_ROOT, build_runtime
from edgemoe.targets import load_target, toolchain

from conftest import PROMPTS, TRAINED_MODEL
from families import FAMILIES

N_NEW = 24


@pytest.fixture(scope="module")
def qemu():
    """The command prefix running aarch64 binaries here (a missing qemu-user is named: setup-dev.sh)."""
    try:
        return toolchain.emulator(load_target("rpi5"))
    except toolchain.ToolchainError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="module")
def arm_runtime(qemu):
    build = REPO_ROOT / "build" / "runtime-aarch64"
    build_runtime(build, load_target("rpi5"))
    return build / "edgemoe_run"


@pytest.mark.parametrize("target,int_dot,layout", [("rpi4", None, "tiles"), ("rpi4", False, "rows"),
                                                  ("rpi5", None, "tiles")])
def test_arm_runtime_matches_reference(qemu, arm_runtime, trained_model, tokenizer, tmp_path, target, int_dot,
                                       layout):
    plan = [[(2, 3, 4, 8)[(layer + e) % 4] for e in range(8)] for layer in range(6)]  # every expert width
    compile_model(TRAINED_MODEL, tmp_path, CompileOptions(target=target, bit_plan=plan, max_seq=128, int_dot=int_dot),
                  log=lambda m: None)
    ref = ReferenceExecutor(artifact_model(trained_model, tmp_path), 128)
    assert json.loads((tmp_path / "manifest.json").read_text())["quantization"]["layout"] == layout
    for prompt in PROMPTS[:2]:
        ids = tokenizer.encode(prompt).ids
        ref.reset()
        want, _ = ref.greedy(ids, N_NEW)
        proc = subprocess.run(qemu.command(arm_runtime, tmp_path, "--tokens", ",".join(map(str, ids)), "-n", N_NEW),
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        got = [int(t) for t in proc.stdout.splitlines()[0].split(",")]
        assert got == want, (prompt, got, want)


# every family of tests/families.py (Mixtral: the trained model above), and the encoder-decoder
@pytest.mark.parametrize("family", sorted(set(FAMILIES) - {"mixtral"}) + ["switch_transformers"])
def test_arm_runtime_runs_every_family(qemu, arm_runtime, tmp_path, family):
    """The layer program on the Raspberry Pi 5 target under qemu: biases, q/k norms, the shared
    expert, LayerNorm, sparsemixer and grouped routing, latent attention and dense layers, attention
    sinks, sliding windows and biased clamped-SwiGLU experts, and Switch Transformers' encoder-decoder
    (the encoder at prefill, relative position biases, dense and ReLU expert MLPs), with a mixed bit
    plan, token for token against the reference of the same artifact."""
    from families import SWITCH_VARIED, save_checkpoint, save_switch_checkpoint

    from edgemoe.models import load_model, reference_executor

    model_dir = (save_switch_checkpoint(tmp_path / "model", **SWITCH_VARIED) if family == "switch_transformers"
                 else save_checkpoint(family, tmp_path / "model"))
    model = load_model(model_dir)
    cfg = model.config
    plan = [[(4, 8, 2, 3)[(l + e) % 4] for e in range(cfg.num_experts)] for l in range(cfg.num_moe_layers)]
    art = tmp_path / "art"
    compile_model(model_dir, art, CompileOptions(target="rpi5", bit_plan=plan, max_seq=64), log=lambda m: None)
    ids = [1, 17, 42, 99, 5]
    want, _ = reference_executor(artifact_model(model, art), 64).greedy(ids, N_NEW)
    proc = subprocess.run(qemu.command(arm_runtime, art, "--tokens", ",".join(map(str, ids)), "-n", N_NEW),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert [int(t) for t in proc.stdout.splitlines()[0].split(",")] == want
