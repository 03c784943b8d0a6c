"""Perplexity harness: the C runtime's perplexity equals the reference's on the same quantized weights."""
import json

import numpy as np

from edgemoe.compiler.artifact_reference import artifact_model
from edgemoe.evaluate import greedy_agreement, perplexity_artifact, perplexity_reference, windows
from edgemoe.models import load_model


def test_artifact_perplexity_equals_reference(tiny_mixtral_dir, rng, tmp_path, runtime_lib):
    from edgemoe.compiler.driver import CompileOptions, compile_model

    compile_model(tiny_mixtral_dir, tmp_path, CompileOptions(expert_bits=8, max_seq=64), log=lambda m: None)
    tokens = rng.integers(0, 160, 150)
    ref = perplexity_reference(artifact_model(load_model(tiny_mixtral_dir), tmp_path), tokens, window=64)
    got = perplexity_artifact(tmp_path, tokens, window=64)
    assert ref["tokens"] == got["tokens"] == 147  # 3 windows (64, 64, 22), each scoring all but its first token
    # float-dequantizing kernels: the same arithmetic; integer-dot kernels: int8 input codes that can
    # round the other way near a boundary (see conftest.assert_matches_reference)
    layout = json.loads((tmp_path / "manifest.json").read_text())["quantization"]["layout"]
    assert abs(ref["nll"] - got["nll"]) < (1e-5 if layout == "rows" else 1e-3)


def test_windows_and_agreement():
    assert [len(w) for w in windows(list(range(10)), 4)] == [4, 4, 2]
    a = greedy_agreement([1, 2, 3, 4], [1, 2, 9, 4])
    assert a == {"positions": 4, "agreement": 0.75, "common_prefix": 2}
    assert np.isclose(greedy_agreement([], [])["agreement"], 0.0)
