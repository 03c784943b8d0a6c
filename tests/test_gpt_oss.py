"""GPT-OSS beyond the parametrized family tests: its YaRN RoPE against transformers' own tables,
MXFP4 experts (a checkpoint packed here per the OCP Microscaling spec, decoded bit-exactly and
against transformers' dequantizer), that the tiny model's sliding window, sinks and clamps act,
the config values the importer refuses by name, and the runtime's checks of the new program operands."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest

from edgemoe.models import ModelImportError, load_model
from edgemoe.models.reference import ReferenceExecutor, forward_sequence, rope_tables

from families import FAMILIES, hf_logits, save_checkpoint


@pytest.fixture(scope="module")
def gpt_oss_dir(tmp_path_factory):
    return save_checkpoint("gpt_oss", tmp_path_factory.mktemp("gpt_oss"))


@pytest.mark.parametrize("rope", [
    dict(),  # GptOssConfig's default: factor 32, beta 32/1, truncate false, original context 4096
    dict(truncate=True),
    dict(factor=8.0, beta_fast=16.0, beta_slow=2.0, original_max_position_embeddings=64, attention_factor=1.25),
    dict(factor=4.0, mscale=1.0, mscale_all_dim=0.5),
])
def test_yarn_tables_are_transformers_yarn(rope):
    import torch
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from edgemoe.models.families import gpt_oss

    from families import COMMON

    params = {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
              "truncate": False, "original_max_position_embeddings": 4096, **rope}
    extra = FAMILIES["gpt_oss"][2]
    hf_cfg = transformers.GptOssConfig(**{**COMMON, **extra, "rope_parameters": params})
    inv_freq, attention = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg)
    cfg = gpt_oss.describe(json.loads(hf_cfg.to_json_string()), "config")
    assert cfg.rope_scale == pytest.approx(attention, rel=1e-12)
    positions = torch.arange(128, dtype=torch.float32)[:, None] * inv_freq[None, :]
    cos, sin = rope_tables(cfg, 128)
    assert np.abs(cos - (positions.cos() * attention).numpy()).max() <= 1e-5
    assert np.abs(sin - (positions.sin() * attention).numpy()).max() <= 1e-5


def test_the_tiny_models_window_sinks_and_clamps_all_act(gpt_oss_dir, rng):
    """Each GPT-OSS feature changes the tiny model's logits well beyond the families' 1e-4 tolerance
    over a sequence longer than its window: the reference-vs-transformers test covers them."""
    model = load_model(gpt_oss_dir)
    tokens = rng.integers(0, 160, 24)
    want = forward_sequence(model, tokens)[0]
    cfg = model.config
    without = {"window": replace(cfg, layer_windows=None), "sinks": replace(cfg, attention_sinks=False),
               "clamps": replace(cfg, swiglu_limit=1e9), "router bias": replace(cfg, router_logit_bias=False)}
    for what, changed in without.items():
        got = forward_sequence(replace(model, config=changed), tokens)[0]
        assert np.abs(got - want).max() > 1e-3, what


def _e2m1_encode(v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MXFP4 per the OCP Microscaling spec, for rows [..., k] (k a multiple of 32): per block of 32 the
    shared scale 2^(floor(log2 max|v|) - 2) (E2M1's largest exponent is 2), each value divided by it
    and rounded to the nearest E2M1 value (saturating at ±6). Returns (blocks [..., k/32, 16] with
    the even element in the low nibble, scale bytes [..., k/32], the values they encode, float64)."""
    magnitudes = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    g = np.ascontiguousarray(v, dtype=np.float64).reshape(*v.shape[:-1], -1, 32)
    amax = np.abs(g).max(axis=-1)
    exp = np.where(amax > 0, np.floor(np.log2(np.where(amax > 0, amax, 1))) - 2, -127).astype(np.int64)
    scaled = g / np.exp2(exp)[..., None]
    mag = np.abs(np.minimum(np.abs(scaled), 6.0)[..., None] - magnitudes).argmin(axis=-1)
    codes = (mag | np.where(scaled < 0, 8, 0)).astype(np.uint8)
    blocks = np.ascontiguousarray(codes[..., 0::2] | (codes[..., 1::2] << 4), dtype=np.uint8)
    values = np.where(scaled < 0, -1, 1) * magnitudes[mag] * np.exp2(exp)[..., None]
    return blocks, np.ascontiguousarray(exp + 127, dtype=np.uint8), values.reshape(v.shape)


def mxfp4_checkpoints(float_dir, out):
    """From the float checkpoint: `out/mxfp4` with the experts' matrices as GPT-OSS ships them
    (*_blocks, *_scales, quantization_config), and `out/decoded`, the float checkpoint with those
    matrices replaced by the values the MXFP4 encodes (for transformers to run)."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(float_dir / "model.safetensors")
    packed, decoded = dict(tensors), dict(tensors)
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        rows = tensors[name].transpose(0, 2, 1)  # [E, outputs, inputs]: MXFP4 blocks run along the inputs
        blocks, scales, values = _e2m1_encode(rows)
        del packed[name]
        packed[name + "_blocks"], packed[name + "_scales"] = blocks, scales
        decoded[name] = np.ascontiguousarray(values.transpose(0, 2, 1).astype(np.float32))
    hf = json.loads((float_dir / "config.json").read_text())
    for kind, arrays, config in (("mxfp4", packed, {**hf, "quantization_config": {
            "quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                                "model.embed_tokens", "lm_head"]}}),
                                 ("decoded", decoded, hf)):
        (out / kind).mkdir()
        save_file(arrays, out / kind / "model.safetensors", metadata={"format": "pt"})
        (out / kind / "config.json").write_text(json.dumps(config))
    return out / "mxfp4", out / "decoded", packed


def test_mxfp4_experts_decode_exactly_and_match_transformers(gpt_oss_dir, tmp_path, rng):
    import torch
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    packed_dir, decoded_dir, packed = mxfp4_checkpoints(gpt_oss_dir, tmp_path)
    model, want = load_model(packed_dir), load_model(decoded_dir)
    for a, b in zip(model.layers, want.layers):
        for ea, eb in zip(a.experts, b.experts):
            for m in ("w_gate", "w_up", "w_down"):
                assert np.array_equal(getattr(ea, m), getattr(eb, m))
    # the packing convention as transformers' own dequantizer reads it ([E, inputs, outputs])
    p = "model.layers.1.mlp.experts.gate_up_proj"
    theirs = convert_moe_packed_tensors(torch.from_numpy(packed[p + "_blocks"]), torch.from_numpy(packed[p + "_scales"]),
                                        dtype=torch.float32).numpy()
    gate_up = np.stack([np.concatenate([e.w_gate, e.w_up]) for e in model.layers[1].experts])  # [E, 2I, H]
    I = model.config.expert_intermediate
    assert np.array_equal(theirs[:, :, 0::2].transpose(0, 2, 1), gate_up[:, :I])
    assert np.array_equal(theirs[:, :, 1::2].transpose(0, 2, 1), gate_up[:, I:])
    tokens = rng.integers(0, 160, 12).tolist()
    ex = ReferenceExecutor(model, max_positions=len(tokens))
    assert np.abs(np.stack([ex.step(t) for t in tokens]) - hf_logits(decoded_dir, tokens)).max() <= 1e-4


@pytest.mark.parametrize("scale,code,message", [(0xFF, 1, "scale byte 0xFF"), (253, 7, "beyond float32's range")])
def test_mxfp4_values_float32_cannot_hold_are_refused(scale, code, message):
    from edgemoe.models.families.gpt_oss import mxfp4

    blocks, scales = np.zeros((1, 2, 1, 16), np.uint8), np.full((1, 2, 1), 127, np.uint8)
    assert np.array_equal(mxfp4.decode(blocks, scales, "t"), np.zeros((1, 2, 32), np.float32))
    blocks[0, 1, 0, 3], scales[0, 1, 0] = code << 4, scale
    with pytest.raises(ModelImportError, match=message):
        mxfp4.decode(blocks, scales, "t")
    scales[0, 1, 0] = 0  # the smallest scale: 0.5 · 2^-127, a float32 subnormal, exactly
    assert mxfp4.decode(blocks, scales, "t")[0, 1, 7] == np.float32(np.ldexp(mxfp4.E2M1[code], -127))


@pytest.mark.parametrize("change,message", [
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
     "rope_type 'linear' is not supported for GPT-OSS"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4, "low_freq_factor": 1.0,
                           "original_max_position_embeddings": 64}), "key 'low_freq_factor' not understood"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4, "partial_rotary_factor": 0.5,
                           "original_max_position_embeddings": 64}), "partial_rotary_factor = 0.5 is not supported"),
    (dict(layer_types=["sliding_attention", "chunked_attention"]), "layer_types = .* is not supported"),
    (dict(sliding_window=0), "sliding_window = 0 is not supported"),
    (dict(swiglu_limit=-1.0), "swiglu_limit = -1.0 is not supported"),
    (dict(quantization_config={"quant_method": "fp8"}), "quantization_config quant_method 'fp8'"),
    (dict(quantization_config={"quant_method": "mxfp4", "group_size": 32}), "key 'group_size' not understood"),
])
def test_config_values_it_does_not_implement_are_refused_naming_them(gpt_oss_dir, tmp_path, change, message):
    bad = tmp_path / "bad"
    shutil.copytree(gpt_oss_dir, bad)
    hf = json.loads((bad / "config.json").read_text())
    hf.update(change)
    (bad / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ModelImportError, match=message):
        load_model(bad)


@pytest.fixture(scope="module")
def gpt_oss_artifact(gpt_oss_dir, tmp_path_factory):
    from edgemoe.compiler.driver import CompileOptions, compile_model

    art = tmp_path_factory.mktemp("gpt_oss_art") / "art"
    compile_model(gpt_oss_dir, art, CompileOptions(expert_bits=4, max_seq=16, int_dot=False), log=lambda m: None)
    return art


def _program_words(art):
    """(trunk.bin bytes, header fields, the program's offset and byte count, its words)."""
    from crafted import TRUNK_FIELDS

    from edgemoe.compiler import trunk_file
    from edgemoe.compiler.binfmt import unpack

    data = (art / "trunk.bin").read_bytes()
    h = dict(zip(TRUNK_FIELDS, unpack(trunk_file.HEADER_FMT[:-1], data)))
    entry = next(e for e in (unpack(trunk_file.TENSOR_FMT, data, h["table_offset"] + i * trunk_file.TENSOR_BYTES)
                             for i in range(h["n_tensors"])) if e[0].rstrip(b"\0") == b"program")
    offset, nbytes = entry[7], entry[8]
    return data, h, offset, nbytes, np.frombuffer(data[offset : offset + nbytes], np.uint32).copy()


def _operand_word(words, op: str, slot: str) -> int:
    """The index in `words` of the first `op` step's operand `slot` (program.py's layout)."""
    from edgemoe.compiler.program import OP_CODES, operand_slots

    at = 0
    while words[at] != OP_CODES[op]:
        at += 2 + int(words[at + 1])
    return at + 2 + operand_slots(op).index(slot)


@pytest.mark.parametrize("op,slot,word,message", [
    ("MOE", "expert_act", 7, "layer 0: unknown expert activation 7"),
    ("MOE", "expert_down_bias", 0xFFFFFFFF, "lacks the layer 0's expert down biases"),
    ("MOE", "router_logit_bias", 0, "the layer 0's router logit bias\\) is not float32 \\[8\\]"),
    ("ATTENTION", "sinks", 0xFFFFFFFF, "kernels.so lacks em_attention, which layer 0's attention needs"),
])
def test_the_runtime_refuses_a_program_whose_gpt_oss_operands_do_not_fit(gpt_oss_artifact, tmp_path, runtime_lib, op,
                                                                           slot, word, message):
    """The new operands are checked before the first token: an unknown activation, a missing bias,
    a tensor of the wrong shape, sinks dropped from an artifact compiled with the sinks kernel alone."""
    from crafted import copy_artifact, patch_trunk

    from edgemoe.compiler.binfmt import crc32
    from edgemoe.runtime import EdgeMoEError, Session

    art = gpt_oss_artifact
    data, h, offset, nbytes, words = _program_words(art)
    words[_operand_word(words, op, slot)] = word
    bad = copy_artifact(art, tmp_path / "bad")
    patched = bytearray(data)
    patched[offset : offset + nbytes] = words.tobytes()
    (bad / "trunk.bin").write_bytes(bytes(patched))
    patch_trunk(bad, header={"data_crc": crc32(bytes(patched[h["data_offset"]:]))}, tensor="program",
                changes={"crc": crc32(words.tobytes())})
    with pytest.raises(EdgeMoEError, match=message):
        with Session(bad, loader_thread=False) as s:
            s.prefill([1, 2, 3])


def test_decode_under_asan_and_ubsan_at_the_minimum_budget(gpt_oss_dir, gpt_oss_artifact):
    """Windows, sinks, the router bias and the biased experts' arguments through the C CLI built
    with AddressSanitizer and UBSan, past the window, with experts read on demand: clean, and the
    reference's greedy tokens."""
    import subprocess

    from test_sanitizers import SANITIZER_ENV, _clean

    from edgemoe.compiler.artifact_reference import artifact_model
    from edgemoe.runtime import REPO_ROOT, budget_bytes, build_runtime

    asan = build_runtime(REPO_ROOT / "build" / "asan", sanitize="address,undefined").parent
    ids = [3, 1, 4, 1, 5]
    want, _ = ReferenceExecutor(artifact_model(load_model(gpt_oss_dir), gpt_oss_artifact), 16).greedy(ids, 10)
    proc = subprocess.run([str(asan / "edgemoe_run"), str(gpt_oss_artifact), "--tokens", ",".join(map(str, ids)),
                           "-n", "10", "--budget", str(budget_bytes(gpt_oss_artifact))], capture_output=True,
                          text=True, timeout=300, env=SANITIZER_ENV)
    assert proc.returncode == 0, proc.stderr
    _clean(proc)
    assert [int(t) for t in proc.stdout.splitlines()[0].split(",")] == want
