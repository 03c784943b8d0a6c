"""onnxruntime as an independent reference: each family's tiny checkpoint exported with torch.onnx
and run on onnxruntime agrees with the project's NumPy reference executor on the float weights, and
its greedy tokens with the C runtime's on float experts and trunk. Three families of distinct
structure in CI; every family in the slow run (an export takes ~20 s)."""
from __future__ import annotations

import numpy as np
import pytest

from edgemoe.models import load_model
from edgemoe.models.reference import ReferenceExecutor
from edgemoe.onnx_reference import OnnxModel

from families import FAMILIES, save_checkpoint

CI_FAMILIES = ("mixtral", "qwen2_moe", "phimoe")  # plain; shared gated expert and biases; LayerNorm + sparsemixer


@pytest.fixture(scope="module", params=[f if f in CI_FAMILIES else pytest.param(f, marks=pytest.mark.slow)
                                        for f in sorted(FAMILIES)])
def exported(request, onnx_exports):
    model_dir, onnx_dir = onnx_exports(request.param)
    return model_dir, OnnxModel(onnx_dir / "model.onnx")


def test_onnxruntime_matches_the_reference_executor(exported, rng):
    model_dir, onnx = exported
    tokens = rng.integers(0, 160, 20).tolist()
    ex = ReferenceExecutor(load_model(model_dir), max_positions=len(tokens))
    want = np.stack([ex.step(t) for t in tokens])
    assert np.abs(onnx.logits(tokens) - want).max() <= 1e-4


def test_runtime_on_float_weights_decodes_onnxruntimes_tokens(exported, tmp_path, runtime_lib):
    from edgemoe.compiler.driver import CompileOptions, compile_model
    from edgemoe.runtime import Session

    model_dir, onnx = exported
    art = tmp_path / "f16"
    compile_model(model_dir, art, CompileOptions(expert_bits=16, trunk_bits=32, max_seq=48), log=lambda m: None)
    prompt = [3, 17, 42, 99, 5]
    with Session(art) as s:
        got = s.generate(prompt, 16)
    assert got == onnx.greedy(prompt, 16)


def test_bench_onnxruntime_row(tmp_path, runtime_lib):
    from click.testing import CliRunner

    from edgemoe.bench import bench_cmd
    from edgemoe.compiler.driver import CompileOptions, compile_model

    model_dir = save_checkpoint("mixtral", tmp_path / "hf")
    art = tmp_path / "int4"
    compile_model(model_dir, art, CompileOptions(expert_bits=4, max_seq=32), log=lambda m: None)
    r = CliRunner().invoke(bench_cmd, ["onnxruntime", str(model_dir), str(art), "--work-dir", str(tmp_path / "onnx"),
                                       "-n", "3", "--threads", "1"])
    assert r.exit_code == 0, (r.output, r.exception)
    row = next(line for line in r.stdout.splitlines() if line.startswith(f"| {art} |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "4.00" and cells[2] == "1" and float(cells[3]) > 0 and float(cells[4]) > 0
    assert (tmp_path / "onnx" / "hf.onnx").is_file()
