"""Every supported family from its tiny random `transformers` checkpoint: the reference executor
against transformers, strict import (unknown keys and unused tensors refused), and the C runtime
against the reference at INT4 and with a mixed bit plan."""
from __future__ import annotations

import json

import numpy as np
import pytest

from edgemoe.models import ModelImportError, load_model
from edgemoe.models.reference import ReferenceExecutor, forward_sequence

from families import FAMILIES, hf_logits, save_checkpoint


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_dir(request, tmp_path_factory):
    return save_checkpoint(request.param, tmp_path_factory.mktemp(request.param))


def test_reference_matches_transformers(family_dir, rng):
    tokens = rng.integers(0, 160, 24).tolist()
    want = hf_logits(family_dir, tokens)
    model = load_model(family_dir)
    ex = ReferenceExecutor(model, max_positions=len(tokens))
    stepped = np.stack([ex.step(t) for t in tokens])
    assert np.abs(stepped - want).max() <= 1e-4
    assert np.abs(forward_sequence(model, np.array(tokens))[0] - want).max() <= 1e-4


def test_unknown_config_key_is_refused_naming_it(family_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(family_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["lm_head_bias"] = True
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelImportError, match="'lm_head_bias' not understood"):
        load_model(bad)


def test_unused_tensor_is_refused_naming_it(family_dir, tmp_path):
    import shutil

    from safetensors.numpy import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(family_dir, bad)
    path = bad / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.0.input_layernorm.bias"] = np.zeros(64, np.float32)  # PhiMoE's LayerNorm bias
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ModelImportError, match="'model.layers.0.input_layernorm.bias'.* not used"):
        load_model(bad)


def test_a_phimoe_checkpoint_calling_itself_mixtral_is_refused(tmp_path):
    """PhiMoE's tensor names match Mixtral's, but its LayerNorm biases and routing do not: the
    config keys and the unused tensors give it away."""
    import torch
    import transformers

    cfg = transformers.PhimoeConfig(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                    num_experts_per_tok=2, max_position_embeddings=128)
    torch.manual_seed(0)
    transformers.PhimoeForCausalLM(cfg).save_pretrained(tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    hf["architectures"] = ["MixtralForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ModelImportError, match="not understood by the Mixtral importer"):
        load_model(tmp_path)
    for key in [k for k in hf if k not in transformers.MixtralConfig().to_dict()]:
        del hf[key]  # even with only Mixtral's keys left, its LayerNorm biases are not Mixtral's
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ModelImportError, match="not used by the Mixtral importer"):
        load_model(tmp_path)


VARIANTS = {  # compile options, and the name of the variant
    "int4": dict(expert_bits=4),
    "mixed-plan": dict(bit_plan="cycle"),
    "rows-trunk32": dict(expert_bits=4, int_dot=False, trunk_bits=32),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_runtime_matches_reference(family_dir, variant, tmp_path, rng, runtime_lib):
    """The C runtime walking the compiled layer program gives the reference executor's logits for
    the same stored weights, with every expert resident and at the minimum budget (experts read)."""
    from conftest import assert_matches_reference

    from edgemoe.compiler.driver import CompileOptions, compile_model
    from edgemoe.compiler.quantize import artifact_model
    from edgemoe.runtime import Session, budget_bytes

    model = load_model(family_dir)
    cfg, opts = model.config, dict(VARIANTS[variant])
    if opts.get("bit_plan") == "cycle":
        levels = (4, 8, 2, 3)
        opts["bit_plan"] = [[levels[(l + e) % 4] for e in range(cfg.num_experts)] for l in range(cfg.num_layers)]
    art = tmp_path / "art"
    compile_model(family_dir, art, CompileOptions(max_seq=64, **opts), log=lambda m: None)
    ref = ReferenceExecutor(artifact_model(model, art), 64)
    tokens = rng.integers(0, 160, 32).tolist()
    want = np.stack([ref.step(t) for t in tokens])
    for budget in (0, budget_bytes(art)):
        with Session(art, memory_budget=budget) as s:
            got = np.stack([s.decode_step(t) for t in tokens])
            st = s.stats()
        assert_matches_reference(got, want, art, 1e-4)
    assert st["expert_misses"] > 0


def test_the_program_scales_are_bound_and_a_non_finite_one_is_refused(tmp_path, runtime_lib):
    """EMBED's and FINAL's scale words carry GraniteMoE's embedding and logit multipliers (float32
    bits); a word that is not a finite float32 is refused naming the operand, before any token."""
    from crafted import TRUNK_FIELDS, copy_artifact, patch_trunk

    from edgemoe.compiler import trunk_file
    from edgemoe.compiler.binfmt import crc32, unpack
    from edgemoe.compiler.driver import CompileOptions, compile_model
    from edgemoe.runtime import EdgeMoEError, Session

    art = tmp_path / "art"
    compile_model(save_checkpoint("granitemoe", tmp_path / "model"), art, CompileOptions(expert_bits=4, max_seq=16),
                  log=lambda m: None)
    data = (art / "trunk.bin").read_bytes()
    h = dict(zip(TRUNK_FIELDS, unpack(trunk_file.HEADER_FMT[:-1], data)))
    entry = next(e for e in (unpack(trunk_file.TENSOR_FMT, data, h["table_offset"] + i * trunk_file.TENSOR_BYTES)
                             for i in range(h["n_tensors"])) if e[0].rstrip(b"\0") == b"program")
    offset, nbytes = entry[7], entry[8]
    words = np.frombuffer(data[offset : offset + nbytes], np.uint32)
    embed_scale, logit_scale = 4, len(words) - 1  # EMBED: op, count, embed, embed.scales, scale; FINAL's last
    assert words[embed_scale].view(np.float32) == np.float32(2.5)
    assert words[logit_scale].view(np.float32) == np.float32(1 / 3.0)
    for word, bits, name in ((embed_scale, 0x7FC00000, "embedding scale"), (logit_scale, 0x7F800000, "logit scale")):
        bad = copy_artifact(art, tmp_path / f"bad{word}")
        patched = bytearray(data)
        changed = words.copy()
        changed[word] = bits
        patched[offset : offset + nbytes] = changed.tobytes()
        (bad / "trunk.bin").write_bytes(bytes(patched))
        patch_trunk(bad, header={"data_crc": crc32(bytes(patched[h["data_offset"]:]))}, tensor="program",
                    changes={"crc": crc32(changed.tobytes())})
        with pytest.raises(EdgeMoEError, match=f"program's {name} is not a finite number"):
            with Session(bad, loader_thread=False) as s:
                s.prefill([1, 2, 3])


def test_the_c_program_contract_is_generated_from_the_python_one():
    from edgemoe.compiler import program
    from edgemoe.runtime import REPO_ROOT

    header = REPO_ROOT / "runtime_c" / "src" / "generated" / "program.h"
    assert header.read_text() == program.c_header(), \
        "regenerate: python -m edgemoe.compiler.program > runtime_c/src/generated/program.h"
