"""Every supported family from its tiny random `transformers` checkpoint: the reference executor
against transformers, strict import (unknown keys and unused tensors refused), and the C runtime
against the reference at INT4 and with a mixed bit plan."""
from __future__ import annotations

import json

import numpy as np
import pytest

from edgemoe.bench import batched_kernels
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


def is_phimoe(family_dir) -> bool:
    """PhiMoE reads the key and the tensor the two tests below give the other families (PhiMoE's own)."""
    return json.loads((family_dir / "config.json").read_text())["architectures"] == ["PhimoeForCausalLM"]


def test_unknown_config_key_is_refused_naming_it(family_dir, tmp_path):
    import shutil

    key = "attn_logit_softcapping" if is_phimoe(family_dir) else "lm_head_bias"  # Gemma 2's, for PhiMoE
    bad = tmp_path / "bad"
    shutil.copytree(family_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg[key] = True
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelImportError, match=f"'{key}' not understood"):
        load_model(bad)


def test_unused_tensor_is_refused_naming_it(family_dir, tmp_path):
    import shutil

    from safetensors.numpy import load_file, save_file

    # PhiMoE's LayerNorm bias; for PhiMoE, OLMoE's q norm
    name = "model.layers.0.self_attn.q_norm.weight" if is_phimoe(family_dir) else "model.layers.0.input_layernorm.bias"
    bad = tmp_path / "bad"
    shutil.copytree(family_dir, bad)
    path = bad / "model.safetensors"
    tensors = load_file(path)
    tensors[name] = np.zeros(64, np.float32)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ModelImportError, match=f"'{name}'.* not used"):
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


def phimoe_longrope_checkpoint(out, form: str):
    """The tiny PhiMoE with Phi-3.5's LongRoPE: short and long factors per frequency, mscales, and an
    original context (64) below max_position_embeddings (128); its rope settings written as
    transformers 5 writes them (rope_parameters) or as Phi-3.5's config.json has them (rope_scaling
    and rope_theta)."""
    import torch
    import transformers

    from families import COMMON

    half = COMMON["hidden_size"] // COMMON["num_attention_heads"] // 2
    rope = dict(rope_type="longrope", rope_theta=10000.0, short_factor=[1.0 + 0.25 * i for i in range(half)],
                long_factor=[4.0] * half, short_mscale=1.19, long_mscale=1.31, original_max_position_embeddings=64)
    _, _, extra = FAMILIES["phimoe"]
    cfg = transformers.PhimoeConfig(**{**COMMON, **extra, "rope_parameters": rope})
    torch.manual_seed(5)
    transformers.PhimoeForCausalLM(cfg).save_pretrained(out)
    if form == "rope_scaling":
        hf = json.loads((out / "config.json").read_text())
        params = hf.pop("rope_parameters")
        hf["rope_theta"] = params.pop("rope_theta")
        params["type"] = params.pop("rope_type")
        hf["rope_scaling"] = params
        (out / "config.json").write_text(json.dumps(hf))
    return out


@pytest.mark.parametrize("form", ["rope_parameters", "rope_scaling"])
def test_phimoe_longrope_within_its_original_context(tmp_path, rng, form, runtime_lib):
    """LongRoPE's short factors and mscale as the RoPE tables, the context capped at
    original_max_position_embeddings: the reference as transformers, the runtime as the reference."""
    from edgemoe.compiler.driver import CompileOptions, compile_model
    from edgemoe.compiler.artifact_reference import artifact_model
    from edgemoe.runtime import Session

    model_dir = phimoe_longrope_checkpoint(tmp_path / "model", form)
    model = load_model(model_dir)
    assert model.config.max_positions == 64 and model.config.rope_scale == 1.19
    tokens = rng.integers(0, 160, 40).tolist()
    want = hf_logits(model_dir, tokens)
    ex = ReferenceExecutor(model)
    assert np.abs(np.stack([ex.step(t) for t in tokens]) - want).max() <= 1e-4
    art = tmp_path / "art"
    compile_model(model_dir, art, CompileOptions(expert_bits=4, int_dot=False, trunk_bits=32), log=lambda m: None)
    assert json.loads((art / "manifest.json").read_text())["max_seq"] == 64
    ref = ReferenceExecutor(artifact_model(model, art))
    want = np.stack([ref.step(t) for t in tokens])
    with Session(art) as s:
        got = np.stack([s.decode_step(t) for t in tokens])
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())


@pytest.mark.parametrize("change,message", [
    (dict(rope_type="yarn"), "rope_type 'yarn' is not supported for PhiMoE"),
    (dict(factor=2.0), "rope_parameters key 'factor' not understood"),
    (dict(short_factor=[1.0, 2.0]), "short_factor must be a list of head_dim/2 = 8"),
    (dict(short_mscale=None), "short_mscale = None is not supported"),
])
def test_phimoe_rope_it_does_not_implement_is_refused_naming_it(tmp_path, change, message):
    model_dir = phimoe_longrope_checkpoint(tmp_path / "model", "rope_parameters")
    hf = json.loads((model_dir / "config.json").read_text())
    hf["rope_parameters"].update(change)
    (model_dir / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ModelImportError, match=message):
        load_model(model_dir)


def test_phimoe_routes_to_exactly_two_experts(tmp_path):
    """The sparsemixer picks two experts whatever num_experts_per_tok says: another value is refused."""
    model_dir = save_checkpoint("phimoe", tmp_path / "model")
    hf = json.loads((model_dir / "config.json").read_text())
    hf["num_experts_per_tok"] = 3
    (model_dir / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ModelImportError, match="num_experts_per_tok = 3 is not supported for PhiMoE"):
        load_model(model_dir)


def test_sparsemixer_is_transformers_eval_sparsemixer(rng):
    """The reference's sparsemixer against transformers' own function in eval mode, on logits of
    every scale and sign, zeros and ties included, at several margins."""
    import torch
    from transformers.models.phimoe.modeling_phimoe import sparsemixer as hf_sparsemixer

    from edgemoe.models.reference import sparsemixer

    for t in range(3000):
        E = int(rng.integers(2, 17))
        s = (rng.standard_normal(E) * rng.choice([0.01, 0.1, 1.0, 10.0])).astype(np.float32)
        if t % 5 == 0:
            s[rng.integers(E)] = 0
        if t % 7 == 0:
            s = -np.abs(s)
        if t % 11 == 0:
            s[:] = 0
        eps = float(rng.choice([0.0, 0.01, 0.1, 0.5]))
        w, idx = hf_sparsemixer(torch.tensor(s)[None], eps, False)
        got_idx, got_w = sparsemixer(s, eps)
        assert got_idx.tolist() == idx[0].tolist(), (s, eps)
        assert np.abs(got_w - w[0].numpy()).max() <= 1e-6, (s, eps)


VARIANTS = {  # compile options, and the name of the variant
    "int4": dict(expert_bits=4),
    # INT2/3/4/8 experts side by side; keys and values kept in float16
    "mixed-plan-kv16": dict(bit_plan="cycle", kv_cache="float16"),
    "rows-trunk32": dict(expert_bits=4, int_dot=False, trunk_bits=32),
    # llama.cpp's Q4_0 everywhere: experts and trunk INT4 on the integer grid
    "llamacpp-trunk4": dict(expert_bits=4, trunk_bits=4, rounding="llamacpp"),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_runtime_matches_reference(family_dir, variant, tmp_path, rng, runtime_lib):
    """The C runtime walking the compiled layer program gives the reference executor's logits for
    the same stored weights, with every expert resident and at the minimum budget (experts read);
    on three compute threads (a layer's experts side by side) the same bits as on one; a prompt run
    a batch of tokens at a time the same bits as token by token."""
    from conftest import assert_matches_reference, assert_routing_matches_reference

    from edgemoe.compiler.driver import CompileOptions, compile_model
    from edgemoe.compiler.artifact_reference import artifact_model
    from edgemoe.runtime import Session, budget_bytes

    model = load_model(family_dir)
    cfg, opts = model.config, dict(VARIANTS[variant])
    if opts.get("bit_plan") == "cycle":
        levels = (4, 8, 2, 3)
        opts["bit_plan"] = [[levels[(l + e) % 4] for e in range(cfg.num_experts)] for l in range(cfg.num_moe_layers)]
    art = tmp_path / "art"
    compile_model(family_dir, art, CompileOptions(max_seq=64, **opts), log=lambda m: None)
    ref = ReferenceExecutor(artifact_model(model, art), 64)
    tokens = rng.integers(0, 160, 32).tolist()
    want = np.stack([ref.step(t) for t in tokens])
    runs = {}
    for budget, threads in ((0, 3), (0, 1), (budget_bytes(art), 1)):
        with Session(art, memory_budget=budget, threads=threads) as s:
            s.trace_routing(len(tokens))
            got = runs[budget, threads] = np.stack([s.decode_step(t) for t in tokens])
            st, trace = s.stats(), s.routing_trace()
        assert_matches_reference(got, want, art, 1e-4)
        # the runtime's routing trace (what cache studies replay) is the reference's choice of experts
        assert_routing_matches_reference(trace, ref, art)
    assert st["expert_misses"] > 0 and st["records_read"] >= st["expert_misses"]
    assert np.array_equal(runs[0, 3], runs[0, 1])
    # a prompt run five tokens at a time through each layer, reads in flight, two threads: the same bits
    # (four of them per call of the batched kernels of a hosted integer-dot artifact: attention
    # projections, shared expert, dense MLP, routed experts)
    with Session(art, memory_budget=budget_bytes(art), threads=2, emulate=(200e6, 0.0005), prefill_tokens=5) as s:
        got = np.stack([s.prefill(tokens[:13]), *(s.decode_step(t) for t in tokens[13:])])
        assert (s.stats()["batched_calls"] > 0) == batched_kernels(art)
    assert np.array_equal(got, runs[budget_bytes(art), 1][12:])


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


@pytest.mark.parametrize("family,layers,dense", [("qwen2_moe", dict(mlp_only_layers=[1]), (1,)),
                                                 ("qwen3_moe", dict(num_hidden_layers=3, decoder_sparse_step=2), (0, 2))])
def test_qwen_dense_layers(tmp_path, rng, family, layers, dense, runtime_lib):
    """Qwen-MoE layers made dense by mlp_only_layers or decoder_sparse_step run the DENSE_FFN op (an
    MLP of intermediate_size, resident at the trunk's bits): the reference as transformers, the
    runtime as the reference at INT4 with every expert layer's records read."""
    import torch
    import transformers

    from conftest import assert_matches_reference
    from families import COMMON

    from edgemoe.compiler.artifact_reference import artifact_model
    from edgemoe.compiler.driver import CompileOptions, compile_model
    from edgemoe.runtime import Session, budget_bytes

    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(3)
    getattr(transformers, model_cls)(getattr(transformers, config_cls)(**{**COMMON, **extra, **layers})).save_pretrained(
        tmp_path / "model")
    model = load_model(tmp_path / "model")
    cfg = model.config
    assert cfg.dense_layers == dense and cfg.num_moe_layers == cfg.num_layers - len(dense)
    tokens = rng.integers(0, 160, 24).tolist()
    ex = ReferenceExecutor(model, max_positions=len(tokens))
    assert np.abs(np.stack([ex.step(t) for t in tokens]) - hf_logits(tmp_path / "model", tokens)).max() <= 1e-4
    art = tmp_path / "art"
    compile_model(tmp_path / "model", art, CompileOptions(expert_bits=4, max_seq=32), log=lambda m: None)
    ref = ReferenceExecutor(artifact_model(model, art), 32)
    want = np.stack([ref.step(t) for t in tokens])
    with Session(art, memory_budget=budget_bytes(art)) as s:
        got = np.stack([s.decode_step(t) for t in tokens])
    assert_matches_reference(got, want, art, 1e-4)
