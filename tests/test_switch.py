"""Switch Transformers, an encoder-decoder: the reference executor against transformers (decoder
logits for an encoder input and a decoder prefix; greedy decoding; expert capacity), strict
import, and the C runtime (encoder at em_prefill, decoder per token, experts of both stacks read
through the one expert cache) against the reference of the same artifact."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edgemoe.models import ModelImportError, load_model
from edgemoe.models.encoder_decoder import EncoderDecoderExecutor

from families import SWITCH_VARIED, save_switch_checkpoint, switch_logits, switch_model

MAX_SEQ = 64


@pytest.fixture(scope="module")
def switch_dir(tmp_path_factory):
    return save_switch_checkpoint(tmp_path_factory.mktemp("switch"))


@pytest.fixture(scope="module")
def varied_dir(tmp_path_factory):
    """The checkpoint whose greedy tokens vary with the input (families.SWITCH_VARIED)."""
    return save_switch_checkpoint(tmp_path_factory.mktemp("switch-varied"), **SWITCH_VARIED)


@pytest.mark.parametrize("sparse,tied", [((1, 2), True), ((2, 1), True), ((1, 2), False)])
def test_reference_matches_transformers(tmp_path, rng, sparse, tied):
    """Encoder sparse step 2 and decoder step 1, and the other way round, and without tied
    embeddings (the encoder's, the decoder's and the LM head each their own): the reference's
    decoder logits for a random encoder input and decoder prefix equal transformers' within 1e-4."""
    model_dir = save_switch_checkpoint(tmp_path, num_sparse_encoder_layers=sparse[0],
                                       num_sparse_decoder_layers=sparse[1], tie_word_embeddings=tied)
    model = load_model(model_dir)
    cfg = model.config
    assert cfg.dense_layers == ((0,) if sparse == (1, 2) else (2,))
    assert (cfg.top_k, cfg.expert_activation, cfg.position, cfg.encoder_layers) == (1, "relu", "relative", 2)
    assert (model.encoder_embed is None) == tied
    encoder_tokens = rng.integers(0, 160, 40).tolist()  # beyond relative_attention_max_distance (24)
    decoder_tokens = [cfg.decoder_start_token_id] + rng.integers(0, 160, 30).tolist()
    want = switch_logits(model_dir, encoder_tokens, decoder_tokens)
    got = EncoderDecoderExecutor(model, MAX_SEQ).decoder_logits(encoder_tokens, decoder_tokens)
    assert np.abs(got - want).max() <= 1e-4


def test_reference_greedy_is_transformers_generate(switch_dir, rng):
    """transformers' cached generation (the decoder one token per call, from the pad token) picks
    the reference's tokens."""
    import torch

    prompt = rng.integers(0, 160, 20).tolist()
    hf = switch_model()
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                          decoder_start_token_id=0)[0].tolist()
    want, _ = EncoderDecoderExecutor(load_model(switch_dir), MAX_SEQ).greedy(prompt, 12)
    assert out == [0] + want


def test_expert_capacity_as_transformers_applies_it(tmp_path, rng, runtime_lib):
    """With expert_capacity 3 and 24 input tokens over 4 experts, the encoder's later tokens of a
    popular expert skip the experts, in transformers as in the reference and the runtime (the
    decoder prefix is no longer than the capacity: one token per call in the runtime); the encoder's
    rows a batch at a time through its experts give the same bits."""
    from edgemoe.compiler.artifact_reference import artifact_model
    from edgemoe.compiler.driver import CompileOptions, compile_model
    from edgemoe.runtime import Session, budget_bytes

    model_dir = save_switch_checkpoint(tmp_path / "model", expert_capacity=3)
    model = load_model(model_dir)
    assert model.config.expert_capacity == 3
    encoder_tokens = rng.integers(0, 160, 24).tolist()
    decoder_tokens = [0] + rng.integers(0, 160, 2).tolist()
    want = switch_logits(model_dir, encoder_tokens, decoder_tokens)
    got = EncoderDecoderExecutor(model, MAX_SEQ).decoder_logits(encoder_tokens, decoder_tokens)
    assert np.abs(got - want).max() <= 1e-4
    unlimited = EncoderDecoderExecutor(load_model(save_switch_checkpoint(tmp_path / "unlimited")), MAX_SEQ)
    assert np.abs(unlimited.decoder_logits(encoder_tokens, decoder_tokens) - want).max() > 1e-3  # it did bind
    art = tmp_path / "art"
    compile_model(model_dir, art, CompileOptions(max_seq=MAX_SEQ, expert_bits=4, int_dot=False, trunk_bits=32),
                  log=lambda m: None)
    want = EncoderDecoderExecutor(artifact_model(model, art), MAX_SEQ).decoder_logits(encoder_tokens, decoder_tokens)
    with Session(art) as s:
        got = np.stack([s.prefill(encoder_tokens)] + [s.decode_step(t) for t in decoder_tokens[1:]])
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
    # the encoder's rows go through its experts a batch at a time (each expert the batch chose read
    # once): at the minimum budget, 5 or 64 rows at a time, the bits of one row at a time
    runs = {}
    for batch in (1, 5, 64):
        with Session(art, memory_budget=budget_bytes(art), prefill_tokens=batch) as s:
            runs[batch] = np.stack([s.prefill(encoder_tokens)] + [s.decode_step(t) for t in decoder_tokens[1:]])
        assert np.array_equal(runs[batch], runs[1]) and np.array_equal(runs[batch], got), batch


def test_relative_buckets_are_transformers_buckets():
    import torch
    from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersAttention

    from edgemoe.models.encoder_decoder import relative_bucket

    rel = np.arange(-600, 601)
    for bidirectional in (True, False):
        for buckets, distance in ((32, 128), (16, 24), (8, 20), (6, 7)):
            want = SwitchTransformersAttention._relative_position_bucket(torch.tensor(rel), bidirectional, buckets,
                                                                         distance).numpy()
            assert relative_bucket(rel, bidirectional, buckets, distance).tolist() == want.tolist()


VARIANTS = {  # compile options, by the name of the variant
    "int4": dict(expert_bits=4),
    "mixed-plan": dict(bit_plan="cycle"),
    "rows-trunk32": dict(expert_bits=4, int_dot=False, trunk_bits=32),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_runtime_matches_reference(varied_dir, variant, tmp_path, rng, runtime_lib):
    """The runtime's decoder logits for an encoder input and a decoder prefix, and its greedy
    tokens, are the reference's for the same stored weights, with every expert resident and at
    the minimum budget (the experts of both stacks read from storage)."""
    from conftest import assert_greedy_matches_reference, assert_matches_reference

    from edgemoe.compiler.artifact_reference import artifact_model
    from edgemoe.compiler.driver import CompileOptions, compile_model
    from edgemoe.runtime import Session, budget_bytes

    model = load_model(varied_dir)
    cfg, opts = model.config, dict(VARIANTS[variant])
    if opts.get("bit_plan") == "cycle":
        levels = (4, 8, 2, 3)
        opts["bit_plan"] = [[levels[(l + e) % 4] for e in range(cfg.num_experts)] for l in range(cfg.num_moe_layers)]
    art = tmp_path / "art"
    compile_model(varied_dir, art, CompileOptions(max_seq=MAX_SEQ, **opts), log=lambda m: None)
    ref = EncoderDecoderExecutor(artifact_model(model, art), MAX_SEQ)
    encoder_tokens = rng.integers(0, 160, 30).tolist()
    decoder_tokens = [cfg.decoder_start_token_id] + rng.integers(0, 160, 20).tolist()
    want = ref.decoder_logits(encoder_tokens, decoder_tokens)
    want_tokens, want_greedy = ref.greedy(encoder_tokens, 16)
    for budget in (0, budget_bytes(art)):
        with Session(art, memory_budget=budget) as s:
            got = np.stack([s.prefill(encoder_tokens)] + [s.decode_step(t) for t in decoder_tokens[1:]])
            tokens, greedy = [], [s.prefill(encoder_tokens)]
            for _ in range(16):
                tokens.append(int(np.argmax(greedy[-1])))
                greedy.append(s.decode_step(tokens[-1]))
            st = s.stats()
        assert_matches_reference(got, want, art, 1e-4)
        assert_greedy_matches_reference(tokens, np.stack(greedy[:-1]), want_tokens, want_greedy, art, 1e-4)
    assert st["expert_misses"] > 0


def test_the_python_api_generates_from_token_ids(varied_dir, tmp_path, runtime_lib):
    import edgemoe
    from edgemoe.compiler.artifact_reference import artifact_model
    from edgemoe.compiler.driver import CompileOptions, compile_model

    art = tmp_path / "art"
    compile_model(varied_dir, art, CompileOptions(max_seq=MAX_SEQ, expert_bits=4), log=lambda m: None)
    prompt = [5, 17, 42, 99, 3, 120]
    ref = EncoderDecoderExecutor(artifact_model(load_model(varied_dir), art), MAX_SEQ)
    want, _ = ref.greedy(prompt, 10)
    eos = load_model(varied_dir).config.eos_token_id
    want = want[: want.index(eos)] if eos in want else want
    with edgemoe.Session(art, cache_fraction=0.0) as s:
        assert list(s.tokens(prompt, max_tokens=10)) == want


def test_decoding_before_the_encoder_ran_is_refused(switch_dir, tmp_path, runtime_lib):
    from edgemoe.compiler.driver import CompileOptions, compile_model
    from edgemoe.runtime import EdgeMoEError, Session

    art = tmp_path / "art"
    compile_model(switch_dir, art, CompileOptions(max_seq=16, expert_bits=4), log=lambda m: None)
    with Session(art) as s:
        with pytest.raises(EdgeMoEError, match="decodes after em_prefill has run its encoder"):
            s.decode_step(0)
        with pytest.raises(EdgeMoEError, match="encoder input holds 17 tokens, more than the context of 16"):
            s.prefill(list(range(17)))
        s.prefill([1, 2, 3])
        s.decode_step(4)
        s.reset()
        with pytest.raises(EdgeMoEError, match="decodes after em_prefill"):
            s.decode_step(0)


def test_calibration_is_refused_for_an_encoder_decoder(switch_dir, tmp_path):
    from edgemoe.compiler.driver import CompileOptions, compile_model

    text = tmp_path / "text.txt"
    text.write_text("the calibration text of a model that cannot use one " * 20)
    with pytest.raises(ValueError, match="encoder-decoder model: calibration, routing profiles and bit-plan"):
        compile_model(switch_dir, tmp_path / "art", CompileOptions(calibration=text),
                      log=lambda m: None)


def test_a_float16_kv_cache_is_refused_for_an_encoder_decoder(switch_dir, tmp_path):
    from edgemoe.compiler.driver import CompileOptions, compile_model

    with pytest.raises(ValueError, match="encoder-decoder model: its KV cache is float32 alone.*--kv-cache float32"):
        compile_model(switch_dir, tmp_path / "art", CompileOptions(kv_cache="float16"), log=lambda m: None)
    assert not (tmp_path / "art").exists()


def test_unknown_config_key_is_refused_naming_it(switch_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(switch_dir, bad)
    hf = json.loads((bad / "config.json").read_text())
    hf["feed_forward_proj"] = "gated-gelu"  # T5 v1.1's gated MLP
    (bad / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ModelImportError, match="feed_forward_proj = 'gated-gelu' is not supported"):
        load_model(bad)
    del hf["feed_forward_proj"]
    hf["rope_theta"] = 10000.0
    (bad / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ModelImportError, match="'rope_theta' not understood by the Switch Transformers importer"):
        load_model(bad)


def test_unused_tensor_is_refused_naming_it(switch_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    name = "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"  # only the first block has one
    bad = tmp_path / "bad"
    shutil.copytree(switch_dir, bad)
    tensors = load_file(bad / "model.safetensors")
    tensors[name] = np.zeros((16, 4), np.float32)
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelImportError, match=f"'{name}'.* not used by the Switch Transformers importer"):
        load_model(bad)


def _patched_program(art, out, edit):
    """A copy of the artifact whose layer program `edit` (words → None, in place) changed, every
    checksum recomputed."""
    from crafted import TRUNK_FIELDS, copy_artifact, patch_trunk

    from edgemoe.compiler import trunk_file
    from edgemoe.compiler.binfmt import crc32, unpack

    bad = copy_artifact(art, out)
    data = bytearray((bad / "trunk.bin").read_bytes())
    h = dict(zip(TRUNK_FIELDS, unpack(trunk_file.HEADER_FMT[:-1], data)))
    entry = next(e for e in (unpack(trunk_file.TENSOR_FMT, data, h["table_offset"] + i * trunk_file.TENSOR_BYTES)
                             for i in range(h["n_tensors"])) if e[0].rstrip(b"\0") == b"program")
    offset, nbytes = entry[7], entry[8]
    words = np.frombuffer(bytes(data[offset : offset + nbytes]), np.uint32).copy()
    edit(words)
    data[offset : offset + nbytes] = words.tobytes()
    (bad / "trunk.bin").write_bytes(bytes(data))
    patch_trunk(bad, header={"data_crc": crc32(bytes(data[h["data_offset"]:]))}, tensor="program",
                changes={"crc": crc32(words.tobytes())})
    return bad


def _steps(words) -> list[tuple[int, int]]:
    """(op code, index of its first operand) of each step."""
    out, at = [], 0
    while at < len(words):
        out.append((int(words[at]), at + 2))
        at += 2 + int(words[at + 1])
    return out


def test_a_program_out_of_shape_is_refused_naming_the_step(switch_dir, tmp_path, runtime_lib):
    """The runtime checks an encoder-decoder program's structure before the first token: causal
    attention in the encoder, cross-attention slots out of order, an encoder without its end."""
    from edgemoe.compiler.driver import CompileOptions, compile_model
    from edgemoe.compiler.program import OP_CODES, operand_slots
    from edgemoe.runtime import EdgeMoEError, Session

    art = tmp_path / "art"
    compile_model(switch_dir, art, CompileOptions(max_seq=16, expert_bits=4), log=lambda m: None)

    def first(words, op):
        return next(at for code, at in _steps(words) if code == OP_CODES[op])

    def causal_encoder(words):
        words[first(words, "REL_ATTENTION") + operand_slots("REL_ATTENTION").index("bidirectional")] = 0

    def cross_out_of_order(words):
        words[first(words, "CROSS_ATTENTION")] = 1

    def no_encoder_end(words):  # ENCODER_OUT becomes a dense feed-forward op of as many operands: refused by count
        words[first(words, "ENCODER_OUT") - 2] = OP_CODES["DENSE_FFN"]

    for edit, message in ((causal_encoder, "causal attention in the encoder"),
                          (cross_out_of_order, r"\(CROSS_ATTENTION\) names layer 1 out of order"),
                          (no_encoder_end, "DENSE_FFN op has 3 operands where this runtime reads")):
        bad = _patched_program(art, tmp_path / edit.__name__, edit)
        with pytest.raises(EdgeMoEError, match=message):
            Session(bad)
