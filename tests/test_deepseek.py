"""DeepSeek-V2/V3 beyond what every family gets (test_families.py): the latent KV cache the runtime
sizes, YaRN RoPE, the routers against transformers' own modules, and the keys refused by name."""
from __future__ import annotations

import json

import numpy as np
import pytest

from edgemoe.models import ModelImportError, load_model
from edgemoe.models.reference import ReferenceExecutor, route_rows

from families import COMMON, FAMILIES, hf_logits, save_checkpoint

PAGE = 4096


def page(n: int) -> int:
    return -(-n // PAGE) * PAGE


def align64(n: int) -> int:
    return -(-n // 64) * 64


def compile_tiny(model_dir, out, **opts):
    from edgemoe.compiler.driver import CompileOptions, compile_model

    compile_model(model_dir, out, CompileOptions(**{"expert_bits": 4, "int_dot": False, "trunk_bits": 32, **opts}),
                  log=lambda m: None)
    return out


@pytest.fixture(scope="module")
def v3_dir(tmp_path_factory):
    return save_checkpoint("deepseek_v3", tmp_path_factory.mktemp("deepseek_v3"))


def test_the_kv_cache_holds_the_latent_and_the_rotated_key(v3_dir, tmp_path, runtime_lib):
    """Per layer and position the runtime budgets kv_lora_rank + qk_rope_head_dim floats (the
    absorbed decode's cache), not a key and a value per head: the budget grows with the context by
    exactly that (plus the attention's score workspace)."""
    from edgemoe.runtime import budget_bytes

    art = compile_tiny(v3_dir, tmp_path / "art", max_seq=128)
    cfg = load_model(v3_dir).config
    L, R, d, heads = cfg.num_layers, cfg.kv_lora_rank, cfg.head_dim, cfg.num_heads

    def kv(seq):  # memory_plan.c: the latents, then the rotated keys, each 64-byte aligned, in whole pages
        return page(align64(L * seq * R * 4) + align64(L * seq * d * 4))

    # from 64 positions on, a prompt's batch (64 tokens, at most the context) no longer grows
    scores = 2 * heads * (128 - 64) * 4  # the attention's scores and exponentials, [heads, seq] each, in workspace
    grown = budget_bytes(art, max_seq=128) - budget_bytes(art, max_seq=64)
    # the workspace is whole pages, and the expert lanes' share of it can outgrow the scores
    assert kv(128) - kv(64) <= grown <= kv(128) - kv(64) + page(scores) + page(1)
    assert grown < L * 64 * heads * (cfg.qk_head_dim + cfg.v_head_dim) * 4  # a key and a value for every head


def yarn_checkpoint(out, family: str, form: str, mscale: float):
    """The tiny DeepSeek with YaRN (factor 8 over an original context of 16; mscale_all_dim 0.707, and
    mscale equal to it as in the real configs, or not, which scales cos and sin): written as
    transformers 5 writes it (rope_parameters) or as DeepSeek's config.json has it (rope_scaling
    beside rope_theta)."""
    import torch
    import transformers

    config_cls, model_cls, extra = FAMILIES[family]
    rope = dict(rope_type="yarn", rope_theta=10000.0, factor=8.0, original_max_position_embeddings=16,
                beta_fast=32, beta_slow=1, mscale=mscale, mscale_all_dim=0.707)
    cfg = getattr(transformers, config_cls)(**{**COMMON, **extra, "rope_parameters": rope})
    torch.manual_seed(7)
    getattr(transformers, model_cls)(cfg).save_pretrained(out)
    if form == "rope_scaling":
        hf = json.loads((out / "config.json").read_text())
        params = hf.pop("rope_parameters")
        hf["rope_theta"] = params.pop("rope_theta")
        params["type"] = params.pop("rope_type")
        hf["rope_scaling"] = params
        (out / "config.json").write_text(json.dumps(hf))
    return out


@pytest.mark.parametrize("family,form,mscale", [("deepseek_v2", "rope_scaling", 0.707),
                                                ("deepseek_v3", "rope_parameters", 1.0)])
def test_yarn_rope_and_softmax_scale(tmp_path, rng, family, form, mscale, runtime_lib):
    """YaRN's frequencies, its cos/sin factor and the mscale² on the softmax: the reference as
    transformers over 40 positions (past the original context), the runtime as the reference."""
    from edgemoe.compiler.artifact_reference import artifact_model
    from edgemoe.runtime import Session

    model_dir = yarn_checkpoint(tmp_path / "model", family, form, mscale)
    model = load_model(model_dir)
    cfg = model.config
    assert cfg.rope_factors is not None and (cfg.rope_scale != 1) == (mscale != 0.707)
    assert cfg.softmax_scale > 1 / cfg.qk_head_dim**0.5
    tokens = rng.integers(0, 160, 40).tolist()
    ex = ReferenceExecutor(model, max_positions=len(tokens))
    assert np.abs(np.stack([ex.step(t) for t in tokens]) - hf_logits(model_dir, tokens)).max() <= 1e-4
    art = compile_tiny(model_dir, tmp_path / "art", max_seq=64)
    ref = ReferenceExecutor(artifact_model(model, art), 64)
    want = np.stack([ref.step(t) for t in tokens])
    with Session(art) as s:
        got = np.stack([s.decode_step(t) for t in tokens])
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_routing_is_transformers_router(family, rng):
    """route_rows against transformers' own router modules on many hidden states: the same experts
    and weights (group-limited softmax for V2, biased sigmoid groups for V3, scaling factor)."""
    import torch
    import transformers
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    from edgemoe.models.families.deepseek import describe

    config_cls, model_cls, extra = FAMILIES[family]
    hf_cfg = getattr(transformers, config_cls)(**{**COMMON, **extra})
    router = (DeepseekV3TopkRouter if family == "deepseek_v3" else DeepseekV2TopkRouter)(hf_cfg).eval()
    hf = {**hf_cfg.to_dict(), "architectures": [model_cls]}
    cfg = describe(hf, "config")
    with torch.no_grad():
        router.weight.normal_(0, 0.5)
        bias = None
        if family == "deepseek_v3":
            router.e_score_correction_bias.normal_(0, 0.2)
            bias = router.e_score_correction_bias.numpy().astype(np.float32)
        x = torch.tensor(rng.standard_normal((2000, COMMON["hidden_size"])), dtype=torch.float32)
        logits, weights, idx = router(x)
    got_idx, got_w = route_rows(cfg, logits.numpy(), bias)
    for row in range(len(x)):
        want = dict(zip(idx[row].tolist(), weights[row].tolist()))
        got = dict(zip(got_idx[row].tolist(), got_w[row].tolist()))
        assert got.keys() == want.keys(), row
        assert max(abs(got[e] - want[e]) for e in got) <= 1e-6, row


@pytest.mark.parametrize("change,message", [
    (dict(num_key_value_heads=2), "num_key_value_heads = 2 is not supported for DeepSeek-V3"),
    (dict(attention_bias=True), "attention_bias = True is not supported"),
    (dict(rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0)), "rope_type 'dynamic'"),
    (dict(rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=2.0, original_max_position_embeddings=64,
                               beta_quick=3)), "rope_parameters key 'beta_quick' not understood"),
    (dict(topk_method="greedy"), "topk_method = 'greedy' is not supported for DeepSeek-V3"),
    (dict(n_group=3), "n_group = 3, topk_group = 2 do not fit 8 experts"),
])
def test_what_it_does_not_implement_is_refused_naming_it(v3_dir, tmp_path, change, message):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(v3_dir, bad)
    hf = json.loads((bad / "config.json").read_text())
    hf.update(change)
    (bad / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ModelImportError, match=message):
        load_model(bad)


def test_v2_renormalised_top_k_is_refused(tmp_path):
    """transformers' DeepSeek-V2 router never renormalises; a config asking for it is refused, not
    silently computed either way."""
    model_dir = save_checkpoint("deepseek_v2", tmp_path / "model")
    hf = json.loads((model_dir / "config.json").read_text())
    hf["norm_topk_prob"] = True
    (model_dir / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ModelImportError, match="norm_topk_prob = True is not supported for DeepSeek-V2"):
        load_model(model_dir)


def test_a_program_or_header_that_does_not_fit_is_refused_naming_it(v3_dir, tmp_path, runtime_lib):
    """The new operands and header sizes are checked before the first token: expert layers out of
    order, groups that do not split the experts, a latent size without its head sizes."""
    from crafted import TRUNK_FIELDS, copy_artifact, patch_trunk

    from edgemoe.compiler import trunk_file
    from edgemoe.compiler.binfmt import crc32, unpack
    from edgemoe.compiler.program import OP_CODES, operand_slots
    from edgemoe.runtime import EdgeMoEError, Session

    art = compile_tiny(v3_dir, tmp_path / "art", max_seq=16)
    data = (art / "trunk.bin").read_bytes()
    h = dict(zip(TRUNK_FIELDS, unpack(trunk_file.HEADER_FMT[:-1], data)))
    entry = next(e for e in (unpack(trunk_file.TENSOR_FMT, data, h["table_offset"] + i * trunk_file.TENSOR_BYTES)
                             for i in range(h["n_tensors"])) if e[0].rstrip(b"\0") == b"program")
    offset, nbytes = entry[7], entry[8]
    words = np.frombuffer(data[offset : offset + nbytes], np.uint32)
    at = 0
    while words[at] != OP_CODES["MOE"]:  # the first MOE op's operands start at at + 2
        at += 2 + int(words[at + 1])

    def refused(name, patch_words=None, header=None, message=""):
        bad = copy_artifact(art, tmp_path / name)
        if patch_words:
            patched, changed = bytearray(data), words.copy()
            for slot, value in patch_words.items():
                changed[at + 2 + operand_slots("MOE").index(slot)] = value
            patched[offset : offset + nbytes] = changed.tobytes()
            (bad / "trunk.bin").write_bytes(bytes(patched))
            patch_trunk(bad, header={"data_crc": crc32(bytes(patched[h["data_offset"]:]))}, tensor="program",
                        changes={"crc": crc32(changed.tobytes())})
        if header:
            patch_trunk(bad, header=header)
        with pytest.raises(EdgeMoEError, match=message):
            with Session(bad, loader_thread=False) as s:
                s.prefill([1, 2, 3])

    refused("order", {"expert_layer": 1}, message="layer 1's experts are expert layer 1 where 0 is due")
    refused("groups", {"route_groups": 3}, message="layer 1: expert groups 3 .* do not fit 8 experts")
    refused("latent", header={"kv_lora": 0}, message="latent attention sizes")


def test_calibrated_search_and_predictors_count_expert_layers(v3_dir, tiny_with_tokenizer, tmp_path, runtime_lib):
    """With a dense first layer, the bit-plan search, the routing profile and the predictors work on
    the expert layers only: a plan of 2 × 8, and the runtime under each predictor and the EdgeMoE
    eviction (the profile's frequencies) gives the reference's tokens at the minimum budget."""
    import shutil

    from conftest import CALIBRATION, TRAINED_MODEL

    from edgemoe.compiler.artifact_reference import artifact_model
    from edgemoe.compiler.driver import CompileOptions, compile_model
    from edgemoe.runtime import Session, budget_bytes

    model_dir = tmp_path / "model"
    shutil.copytree(v3_dir, model_dir)
    shutil.copy(tiny_with_tokenizer / "tokenizer.json", model_dir / "tokenizer.json")
    art = tmp_path / "art"
    compile_model(model_dir, art, CompileOptions(calibration=CALIBRATION, calibration_tokens=600, max_bits=3.0,
                                                 search_text=TRAINED_MODEL / "search.txt", max_seq=64),
                  log=lambda m: None)
    manifest = json.loads((art / "manifest.json").read_text())
    plan = manifest["quantization"]["bit_plan"]
    assert len(plan) == 2 and all(len(row) == 8 for row in plan) and np.mean(plan) <= 3.0
    assert np.array(manifest["profile"]["expert_frequency"]).shape == (2, 8)
    ids = [1, 17, 42, 99, 5]
    want, _ = ReferenceExecutor(artifact_model(load_model(model_dir), art), 64).greedy(ids, 12)
    for predictor in ("fitted-router", "next-router", "path-table"):
        with Session(art, memory_budget=budget_bytes(art), predictor=predictor, eviction="edgemoe") as s:
            got = s.generate(ids, 12)
            st = s.stats()
        assert got == want, predictor
        assert st["predicted"] > 0


V2_LITE = {  # the keys of DeepSeek-V2-Lite's config.json, as its checkpoint ships it (pre-transformers-5 form)
    "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV2Config"}, "aux_loss_alpha": 0.001,
    "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 10944, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "model_type": "deepseek_v2", "moe_intermediate_size": 1408,
    "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": False,
    "num_attention_heads": 16, "num_experts_per_tok": 6, "num_hidden_layers": 27, "num_key_value_heads": 16,
    "pretraining_tp": 1, "q_lora_rank": None, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 102400}
V3 = {**V2_LITE, "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "ep_size": 1,
      "first_k_dense_replace": 3, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
      "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128,
      "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1,
      "q_lora_rank": 1536, "rope_scaling": {**V2_LITE["rope_scaling"], "mscale": 1.0, "mscale_all_dim": 1.0},
      "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "topk_group": 4, "topk_method": "noaux_tc",
      "vocab_size": 129280}


def test_the_published_configs_are_read_whole():
    """Every key of the V2-Lite and V3 configs is understood (training and remote-code keys read as
    such); V3's FP8 quantization_config is refused by name, its block-scaled weights not implemented."""
    from edgemoe.models.families.deepseek import describe

    lite = describe(V2_LITE, "V2-Lite")
    assert (lite.attention, lite.q_lora_rank, lite.kv_lora_rank, lite.head_dim, lite.dense_layers) == \
        ("mla", 0, 512, 64, (0,))
    assert (lite.routing, lite.route_groups, lite.shared_expert_intermediate) == ("softmax", 1, 2 * 1408)
    assert lite.rope_factors[0] == 1.0 and lite.rope_factors[-1] == 40.0 and lite.rope_scale == 1.0
    assert lite.softmax_scale == pytest.approx((0.1 * 0.707 * np.log(40) + 1) ** 2 / 192**0.5)
    v3 = describe(V3, "V3")
    assert (v3.routing, v3.router_bias, v3.route_groups, v3.route_topk_groups, v3.route_scale, v3.dense_layers) == \
        ("sigmoid", True, 8, 4, 2.5, (0, 1, 2))
    with pytest.raises(ModelImportError, match="'quantization_config' not understood"):
        describe({**V3, "quantization_config": {"quant_method": "fp8"}}, "V3")
