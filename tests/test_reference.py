"""The NumPy reference executor against transformers on CPU (the ground truth for everything else)."""
import numpy as np
import pytest
import torch
import transformers

from edgemoe.models import ModelImportError, load_model
from edgemoe.models.reference import ReferenceExecutor

from conftest import TRAINED_MODEL


def _hf_logits(model_dir, tokens):
    hf = transformers.MixtralForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0].numpy()


def _ours(model_dir, tokens):
    ex = ReferenceExecutor(load_model(model_dir), max_positions=len(tokens))
    return np.stack([ex.step(t) for t in tokens])


def test_matches_transformers_on_random_tiny_mixtral(tiny_mixtral_dir, rng):
    tokens = rng.integers(0, 160, 40).tolist()
    diff = np.abs(_ours(tiny_mixtral_dir, tokens) - _hf_logits(tiny_mixtral_dir, tokens)).max()
    assert diff <= 1e-4, diff


def test_matches_transformers_on_trained_model(trained_model, tokenizer, rng):
    text = "ROMEO:\nBut soft, what light through yonder window breaks? It is the east"
    tokens = tokenizer.encode(text).ids + rng.integers(0, trained_model.config.vocab_size, 8).tolist()
    diff = np.abs(_ours(TRAINED_MODEL, tokens) - _hf_logits(TRAINED_MODEL, tokens)).max()
    assert diff <= 1e-4, diff


def test_unknown_architecture_is_named(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["FalconForCausalLM"], "model_type": "falcon"}')
    with pytest.raises(ModelImportError, match="FalconForCausalLM.*supported: .*MixtralForCausalLM"):
        load_model(tmp_path)


def test_missing_tensor_is_named(tiny_mixtral_dir, tmp_path):
    import shutil

    from safetensors.numpy import load_file, save_file

    t = load_file(tiny_mixtral_dir / "model.safetensors")
    del t["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(t, tmp_path / "model.safetensors")
    shutil.copy(tiny_mixtral_dir / "config.json", tmp_path)
    with pytest.raises(ModelImportError, match="experts.2.w3.weight"):
        load_model(tmp_path)


def test_out_of_range_token_is_refused(trained_model):
    ex = ReferenceExecutor(trained_model, max_positions=4)
    with pytest.raises(ValueError, match="out of range"):
        ex.step(trained_model.config.vocab_size)
