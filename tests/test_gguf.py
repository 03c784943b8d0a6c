"""GGUF import (models/gguf_import.py): tiny random checkpoints of every family with a llama.cpp
counterpart, written as GGUF the way llama.cpp's converter writes them (its tensor names and
metadata keys, q/k rows permuted for the "llama" architecture), import to the same MoEModel as
their Hugging Face directories — exactly in F32, within the quantization error in Q8_0 / Q4_0 —
and give transformers' logits; strictness; and a GGUF compiled and decoded by the C runtime."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgemoe.compiler import trunk_file
from edgemoe.compiler.binfmt import unpack
from edgemoe.compiler.program import TRUNK_FLAGS
from edgemoe.models import ModelImportError, describe_model, load_model

from families import hf_logits, save_checkpoint

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

# family → llama.cpp architecture (general.architecture)
GGUF_FAMILIES = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "olmoe": "olmoe"}


def llama_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute (convert_hf_to_gguf.py): rotate-half rows → interleaved pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(hf_dir: Path, family: str) -> dict[str, np.ndarray]:
    """The checkpoint's tensors under llama.cpp's GGUF names, experts stacked [E, …], q/k permuted
    for the llama architecture."""
    import json

    from safetensors.numpy import load_file

    hf = json.loads((hf_dir / "config.json").read_text())
    st = load_file(hf_dir / "model.safetensors")
    heads, kv_heads = hf["num_attention_heads"], hf["num_key_value_heads"]
    if family == "mixtral":
        moe, (gate, up, down), router = "block_sparse_moe", ("w1", "w3", "w2"), "gate"
    else:
        moe, (gate, up, down), router = "mlp", ("gate_proj", "up_proj", "down_proj"), "gate"
    E = hf.get("num_local_experts") or hf["num_experts"]
    out = {"token_embd.weight": st.pop("model.embed_tokens.weight"), "output_norm.weight": st.pop("model.norm.weight")}
    if "lm_head.weight" in st:
        out["output.weight"] = st.pop("lm_head.weight")
    attn = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
            "q_norm": "attn_q_norm", "k_norm": "attn_k_norm"}
    for i in range(hf["num_hidden_layers"]):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        out[b + "attn_norm.weight"] = st.pop(p + "input_layernorm.weight")
        out[b + "ffn_norm.weight"] = st.pop(p + "post_attention_layernorm.weight")
        for hf_name, g_name in attn.items():
            for kind in ("weight", "bias"):
                if (key := f"{p}self_attn.{hf_name}.{kind}") in st:
                    w = st.pop(key)
                    if family == "mixtral" and hf_name in ("q_proj", "k_proj"):
                        w = llama_permute(w, heads if hf_name == "q_proj" else kv_heads)
                    out[f"{b}{g_name}.{kind}"] = w
        m = f"{p}{moe}."
        out[b + "ffn_gate_inp.weight"] = st.pop(m + router + ".weight")
        for hf_name, g_name in ((gate, "gate"), (up, "up"), (down, "down")):
            out[f"{b}ffn_{g_name}_exps.weight"] = np.stack([st.pop(f"{m}experts.{e}.{hf_name}.weight")
                                                            for e in range(E)])
        if f"{m}shared_expert_gate.weight" in st:
            # [1, H] squeezed to [H], as the converter squeezes every tensor
            out[b + "ffn_gate_inp_shexp.weight"] = st.pop(f"{m}shared_expert_gate.weight").squeeze(0)
            for kind in ("gate", "up", "down"):
                out[f"{b}ffn_{kind}_shexp.weight"] = st.pop(f"{m}shared_expert.{kind}_proj.weight")
    assert not st, f"tensors the test writer does not map: {sorted(st)}"
    return out


def write_gguf(hf_dir: Path, family: str, path: Path, qtype=Q.F32, extra_kv: dict | None = None,
               extra_tensors: dict | None = None, arch: str | None = None, vocabulary: bool = False) -> Path:
    """The checkpoint as a GGUF with the metadata llama.cpp's converter writes; matrices in `qtype`
    except the router (llama-quantize keeps ffn_gate_inp in F32), vectors in F32."""
    import json

    hf = json.loads((hf_dir / "config.json").read_text())
    arch = arch or GGUF_FAMILIES[family]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_type("model")
    w.add_name(f"tiny {family}")
    w.add_file_type(int(qtype))
    w.add_context_length(hf["max_position_embeddings"])
    w.add_embedding_length(hf["hidden_size"])
    w.add_block_count(hf["num_hidden_layers"])
    w.add_feed_forward_length(hf["intermediate_size"])
    w.add_head_count(hf["num_attention_heads"])
    w.add_head_count_kv(hf["num_key_value_heads"])
    w.add_rope_freq_base(hf.get("rope_parameters", {}).get("rope_theta") or hf["rope_theta"])
    w.add_layer_norm_rms_eps(hf["rms_norm_eps"])
    w.add_expert_count(hf.get("num_local_experts") or hf["num_experts"])
    w.add_expert_used_count(hf["num_experts_per_tok"])
    if hf.get("head_dim"):
        w.add_key_length(hf["head_dim"])
        w.add_value_length(hf["head_dim"])
    if arch == "llama":
        w.add_vocab_size(hf["vocab_size"])
        w.add_rope_dimension_count(hf["hidden_size"] // hf["num_attention_heads"])
    if "moe_intermediate_size" in hf:
        w.add_expert_feed_forward_length(hf["moe_intermediate_size"])
    if "shared_expert_intermediate_size" in hf:
        w.add_expert_shared_feed_forward_length(hf["shared_expert_intermediate_size"])
    w.add_tokenizer_model("gpt2")
    if vocabulary:  # the checkpoint's own byte-level BPE, as llama.cpp's converter stores it
        spec = json.loads((hf_dir / "tokenizer.json").read_text())
        tokens = {i: t for t, i in spec["model"]["vocab"].items()} | {a["id"]: a["content"] for a in spec["added_tokens"]}
        special = {a["id"] for a in spec["added_tokens"] if a["special"]}
        w.add_token_list([tokens[i] for i in range(len(tokens))])
        w.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
        w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
        w.add_string("tokenizer.ggml.pre", "gpt-2")
        w.add_chat_template("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    else:
        w.add_token_list([f"<t{i}>" for i in range(hf["vocab_size"])])
        w.add_token_types([1] * hf["vocab_size"])
        w.add_token_merges(["< t", "<t 1"])
    for key, setter in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id)):
        if hf.get(key) is not None:
            setter(hf[key])
    for key, value in (extra_kv or {}).items():
        {bool: w.add_bool, int: w.add_uint32, float: w.add_float32, str: w.add_string}[type(value)](key, value)
    for name, t in {**gguf_tensors(hf_dir, family), **(extra_tensors or {})}.items():
        t = np.ascontiguousarray(t, dtype=np.float32)
        if qtype != Q.F32 and t.ndim >= 2 and "ffn_gate_inp" not in name:
            w.add_tensor(name, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def model_arrays(model) -> dict[str, np.ndarray]:
    """Every array of a MoEModel by a readable name."""
    out = {"embed": model.embed, "final_norm": model.final_norm, "lm_head": model.lm_head}
    for i, layer in enumerate(model.layers):
        for name, value in vars(layer).items():
            if isinstance(value, np.ndarray):
                out[f"layers.{i}.{name}"] = value
        for e, ex in enumerate(layer.experts + ([layer.shared] if layer.shared is not None else [])):
            for name, value in vars(ex).items():
                out[f"layers.{i}.experts.{e}.{name}"] = value
    return out


@pytest.fixture(scope="module", params=sorted(GGUF_FAMILIES))
def checkpoint(request, tmp_path_factory):
    """(family, HF directory, F32 GGUF)."""
    family = request.param
    root = tmp_path_factory.mktemp(f"gguf_{family}")
    hf_dir = save_checkpoint(family, root / "hf")
    return family, hf_dir, write_gguf(hf_dir, family, root / f"{family}-f32.gguf")


def test_f32_gguf_imports_the_hf_checkpoints_model_exactly(checkpoint):
    family, hf_dir, path = checkpoint
    want, got = load_model(hf_dir), load_model(path)
    assert got.config == want.config
    assert describe_model(path) == want.config
    a, b = model_arrays(want), model_arrays(got)
    assert a.keys() == b.keys()
    for name in a:
        assert b[name].dtype == np.float32 and np.array_equal(a[name], b[name]), name


def test_reference_on_the_gguf_import_matches_transformers(checkpoint, rng):
    from edgemoe.models.reference import ReferenceExecutor

    family, hf_dir, path = checkpoint
    tokens = rng.integers(0, 160, 16).tolist()
    want = hf_logits(hf_dir, tokens)
    ex = ReferenceExecutor(load_model(path), max_positions=len(tokens))
    assert np.abs(np.stack([ex.step(t) for t in tokens]) - want).max() <= 1e-4


def test_q8_0_gguf_imports_within_its_rounding(checkpoint, tmp_path):
    family, hf_dir, _ = checkpoint
    want = model_arrays(load_model(hf_dir))
    got = model_arrays(load_model(write_gguf(hf_dir, family, tmp_path / "q8.gguf", Q.Q8_0)))
    assert_within_block_rounding(want, got, step=0.5 / 127)


@pytest.mark.parametrize("qtype", ["F32", "BF16", "Q8_0", "Q4_0"])
def test_gguf_experts_stay_in_the_file_until_read(qtype, tmp_path):
    """For the streaming compile a GGUF's routed experts are left in the file (GGUFTensor: the
    expert's byte range, dequantized when read, pickled as its address for worker processes): each
    reads as the eager import's array, bit for bit; the trunk's matrices too where the whole model
    is left stored."""
    import pickle

    from edgemoe.models.gguf_import import GGUFTensor
    from edgemoe.models.stored_tensor import RowOrder

    hf_dir = save_checkpoint("mixtral", tmp_path / "hf")
    path = write_gguf(hf_dir, "mixtral", tmp_path / "m.gguf", Q[qtype])
    eager, lazy = load_model(path), load_model(path, lazy_experts=True)
    assert isinstance(lazy.layers[0].wo, np.ndarray)
    stored = load_model(path, lazy=True)
    for name, want in (("embed", eager.embed), ("wv", eager.layers[1].wv), ("wo", eager.layers[1].wo)):
        got = stored.embed if name == "embed" else getattr(stored.layers[1], name)
        assert isinstance(got, GGUFTensor) and np.array_equal(np.asarray(got), want), name
    for name in ("wq", "wk"):  # llama's: rows reordered as read (RowOrder), the levels too
        got = getattr(stored.layers[1], name)
        assert isinstance(got, RowOrder) and np.array_equal(np.asarray(got), getattr(eager.layers[1], name)), name
        if qtype in ("Q8_0", "Q4_0"):
            levels, scales = got.stored_levels(32)
            assert np.array_equal(levels * scales.astype(np.float32).repeat(32, axis=1), np.asarray(got)), name
    for le, ll in zip(eager.layers, lazy.layers):
        for ee, el in zip(le.experts, ll.experts):
            for stored, want in zip(el.matrices(), ee.matrices(), strict=True):
                assert isinstance(stored, GGUFTensor) and stored.path == path
                got = np.asarray(pickle.loads(pickle.dumps(stored)))
                assert got.dtype == np.float32 and np.array_equal(got, want)


# the largest error of a block type, in units of its block's largest magnitude: half a step (Q4_0: a
# step for its clipped positive extreme; Q4_1 / Q5_1: steps of the block's range, up to twice that)
BLOCK_STEP = {"Q4_0": 1 / 8, "Q4_1": 1 / 15, "Q5_0": 1 / 16, "Q5_1": 1 / 31}


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_other_tensor_types_dequantize(qtype, tmp_path):
    """Q4_1, Q5_0 and Q5_1 among them: llama-quantize's Q4_K_M of an 8-expert llama puts some experts
    in Q5_0."""
    hf_dir = save_checkpoint("mixtral", tmp_path / "hf")
    want = model_arrays(load_model(hf_dir))
    got = model_arrays(load_model(write_gguf(hf_dir, "mixtral", tmp_path / "m.gguf", Q[qtype])))
    if qtype in BLOCK_STEP:
        assert_within_block_rounding(want, got, step=BLOCK_STEP[qtype])
    else:
        for name in want:
            tol = 2.0 ** (-8 if qtype == "BF16" else -11) * np.abs(want[name]).max()
            assert np.abs(got[name] - want[name]).max() <= tol, name


def assert_within_block_rounding(want: dict, got: dict, step: float) -> None:
    """Each matrix within `step` × its block of 32's largest magnitude of the original (Q8_0: half
    of max/127; Q4_0: max/8, its positive extreme clipped to 7 steps), plus the fp16 rounding of
    the block's scale, and changed by the rounding; vectors and routers (kept F32) exact."""
    changed = 0
    for name, w in want.items():
        g = got[name]
        if w.ndim == 1 or name.endswith("router") or name.endswith("shared_gate"):
            assert np.array_equal(w, g), name
            continue
        blocks = np.abs(w.reshape(-1, 32)).max(axis=1, keepdims=True)
        err = np.abs((g - w).reshape(-1, 32))
        assert (err <= blocks * (step + 2.0 ** -10)).all(), name
        changed += not np.array_equal(w, g)
    assert changed


def test_unpermute_inverts_llama_cpps_permutation(rng):
    from edgemoe.models.gguf_import import unpermute_rows

    for heads, shape in ((4, (64, 48)), (2, (32, 48)), (4, (64,))):
        w = rng.standard_normal(shape).astype(np.float32)
        assert np.array_equal(unpermute_rows(llama_permute(w, heads), heads), w)
        assert not np.array_equal(llama_permute(w, heads), w)
    # transformers' own GGUF loader undoes it the same way (an independent reading of llama.cpp's converter)
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    theirs = LlamaTensorProcessor(config={})._reverse_permute_weights
    w = rng.standard_normal((32, 48)).astype(np.float32)
    assert np.array_equal(unpermute_rows(w, 2), theirs(w, 4, 2))


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf_strict")
    return save_checkpoint("mixtral", root / "hf")


@pytest.mark.parametrize("key, value", [("llama.rope.scaling.type", "linear"), ("llama.attention.sliding_window", 4096),
                                        ("llama.final_logit_softcapping", 30.0), ("llama.expert_weights_norm", False),
                                        ("llama.leading_dense_block_count", 1)])
def test_metadata_that_changes_the_arithmetic_is_refused_naming_it(mixtral, tmp_path, key, value):
    path = write_gguf(mixtral, "mixtral", tmp_path / "bad.gguf", extra_kv={key: value})
    with pytest.raises(ModelImportError, match=key.replace(".", r"\.")):
        load_model(path)
    with pytest.raises(ModelImportError, match=key.replace(".", r"\.")):
        describe_model(path)


def test_bookkeeping_metadata_is_accepted(mixtral, tmp_path):
    path = write_gguf(mixtral, "mixtral", tmp_path / "ok.gguf",
                      extra_kv={"general.license": "apache-2.0", "quantize.imatrix.chunks_count": 100,
                                "tokenizer.ggml.add_bos_token": True, "llama.rope.scaling.type": "none"})
    assert load_model(path).config == load_model(mixtral).config


@pytest.mark.parametrize("name", ["rope_freqs.weight", "blk.0.attn_rot_embd", "blk.1.ffn_gate.weight",
                                  "blk.0.attn_q.bias"])
def test_an_unused_tensor_is_refused_naming_it(mixtral, tmp_path, name):
    shape = (32,) if name.endswith(("rope_freqs.weight", "attn_rot_embd")) else (64,) if "bias" in name else (96, 64)
    path = write_gguf(mixtral, "mixtral", tmp_path / "bad.gguf", extra_tensors={name: np.ones(shape, np.float32)})
    with pytest.raises(ModelImportError, match=f"'{name}'.* not used by the Mixtral GGUF importer"):
        load_model(path)


def test_unknown_architectures_dense_models_and_unsupported_types_are_refused(mixtral, tmp_path):
    path = write_gguf(mixtral, "mixtral", tmp_path / "granite.gguf", arch="granitemoe")
    with pytest.raises(ModelImportError, match="unknown GGUF architecture 'granitemoe'; supported: llama, olmoe"):
        load_model(path)
    path = write_gguf(mixtral, "mixtral", tmp_path / "dense.gguf", extra_kv={})
    from gguf import GGUFReader  # a llama without experts: rewrite expert_count to 0 in place

    r = GGUFReader(str(path), "r+")
    r.fields["llama.expert_count"].parts[-1][0] = 0
    r.data.flush()
    del r
    with pytest.raises(ModelImportError, match="expert_count is 0: a dense llama"):
        load_model(path)
    path = write_gguf(mixtral, "mixtral", tmp_path / "mxfp4.gguf", Q.MXFP4)
    with pytest.raises(ModelImportError, match="tensor 'token_embd.weight' is of GGML type MXFP4; supported"):
        load_model(path)


def test_gguf_in_a_directory(mixtral, tmp_path):
    """A directory with one .gguf and no config.json is a GGUF checkpoint; two are refused; with
    config.json it is a Hugging Face directory."""
    from edgemoe.models.gguf_import import read_vocabulary

    d = tmp_path / "model"
    d.mkdir()
    write_gguf(mixtral, "mixtral", d / "tiny-f32.gguf")
    assert load_model(d).config == load_model(mixtral).config
    vocab = read_vocabulary(d)
    assert vocab.model == "gpt2" and len(vocab.tokens) == 160 and vocab.tokens[7] == "<t7>"
    assert vocab.merges == ["< t", "<t 1"] and vocab.bos_token_id == 1 and vocab.eos_token_id == 2
    shutil.copy(d / "tiny-f32.gguf", d / "other.gguf")
    with pytest.raises(ModelImportError, match="2 .gguf files .*other.gguf, tiny-f32.gguf"):
        load_model(d)
    with pytest.raises(ModelImportError, match="not found"):
        load_model(tmp_path / "missing.gguf")
    (d / "other.gguf").unlink()
    for f in mixtral.iterdir():
        shutil.copy(f, d / f.name)
    assert load_model(d).config == load_model(mixtral).config  # config.json wins
    shutil.copy(d / "tiny-f32.gguf", tmp_path / "truncated.gguf")
    with open(tmp_path / "truncated.gguf", "r+b") as fh:
        fh.truncate(1000)
    with pytest.raises(ModelImportError, match="truncated.gguf"):
        load_model(tmp_path / "truncated.gguf")


def test_a_gguf_compiles_and_decodes_the_hf_directorys_tokens(mixtral, tmp_path, rng, runtime_lib):
    """The compiler takes a GGUF path like a model directory (text options need a tokenizer.json
    beside the .gguf; none here: token ids only), and the C runtime decodes the same greedy tokens."""
    from edgemoe.compiler.driver import CompileOptions, compile_model
    from edgemoe.runtime import Session

    path = write_gguf(mixtral, "mixtral", tmp_path / "mixtral-f32.gguf")
    opts = CompileOptions(expert_bits=4, max_seq=48)
    prompt, tokens = rng.integers(0, 160, 8).tolist(), {}
    for name, source in (("hf", mixtral), ("gguf", path)):
        compile_model(source, tmp_path / name, opts, log=lambda m: None)
        with Session(tmp_path / name) as s:
            tokens[name] = s.generate(prompt, 24)
    assert tokens["gguf"] == tokens["hf"]


def test_a_gguf_compiles_with_the_tokenizer_it_carries(tmp_path, runtime_lib):
    """The bundled model as a GGUF holding its vocabulary and no tokenizer.json beside it: compiled
    with calibration text, it generates the HF directory's text (the same sampled tokens)."""
    import edgemoe
    from conftest import CALIBRATION, TRAINED_MODEL

    gguf_dir = tmp_path / "gguf"
    gguf_dir.mkdir()
    write_gguf(TRAINED_MODEL, "mixtral", gguf_dir / "mixtral-mini.gguf", vocabulary=True)
    texts = []
    for source, out in ((gguf_dir / "mixtral-mini.gguf", tmp_path / "from-gguf"), (TRAINED_MODEL, tmp_path / "from-hf")):
        manifest = edgemoe.compile(source, out, bits=4, max_seq=128, calibration=CALIBRATION, calibration_tokens=1024)
        assert manifest["tokenizer"]["c_runtime"], manifest["tokenizer"]
        with edgemoe.Session(out) as s:
            texts.append("".join(s.generate("ROMEO:", max_tokens=24, temperature=0.7, seed=3)))
    assert texts[0] == texts[1] and len(texts[0]) > 20
    assert json.loads((tmp_path / "from-gguf" / "tokenizer_config.json").read_text())["chat_template"]


@pytest.mark.parametrize("int_dot", [None, False], ids=["auto-kernels", "float-kernels"])
def test_q4_0_blocks_are_stored_unrounded_on_the_integer_grid(mixtral, tmp_path, rng, runtime_lib, int_dot):
    """A Q4_0 GGUF's experts compile at INT4 on the integer grid: every expert weight is the GGUF's
    own value (d times a level -8…7), not rounded again; its Q4_0 trunk matrices at INT8 and at INT4
    (on the same grid) likewise. The runtime's logits match the reference on those weights (the
    embedding rows dequantized by the runtime on that grid); an HF directory compiles on the half
    grid unless told."""
    from conftest import assert_matches_reference
    from edgemoe.compiler.artifact_reference import artifact_model
    from edgemoe.compiler.driver import CompileOptions, compile_model
    from edgemoe.compiler.expert_image import read_experts, read_table
    from edgemoe.compiler.quantize import compiled_trunk
    from edgemoe.models import read_stored
    from edgemoe.models.reference import ReferenceExecutor
    from edgemoe.runtime import Session

    path = write_gguf(mixtral, "mixtral", tmp_path / "mixtral-q4_0.gguf", Q.Q4_0)
    out = tmp_path / "artifact"
    manifest = compile_model(path, out, CompileOptions(expert_bits=4, max_seq=48, int_dot=int_dot), log=lambda m: None)
    assert manifest["quantization"]["int4_grid"] == "integer"
    assert manifest["quantization"]["trunk_bits"] == 4  # --trunk-bits auto: every trunk matrix is Q4_0
    assert read_table(out / "experts.bin")[0].int4_grid == "integer"
    flags = unpack(trunk_file.HEADER_FMT[:-1], (out / "trunk.bin").read_bytes())[15]
    assert flags & TRUNK_FLAGS["int4_integer"]
    model = load_model(path)  # every tensor dequantized to float32: the GGUF's values
    for layer, row in zip(model.layers, read_experts(out / "experts.bin")):
        for e, stored in zip(layer.experts, row):
            for w, m in zip(e.matrices(), stored.matrices(), strict=True):
                assert m.bits == 4 and m.grid == "integer" and np.array_equal(m.dequantize(), w)
    for bits, grid in ((8, "half"), (4, "integer")):  # the trunk as stored at INT8 and INT4, Q4_0 blocks repacked
        trunk = compiled_trunk(load_model(path, lazy=True), bits, int4_grid=grid)
        assert np.array_equal(np.asarray(trunk.layers[0].wo), model.layers[0].wo)
        assert np.array_equal(np.asarray(trunk.embed), model.embed)

    reference = ReferenceExecutor(read_stored(artifact_model(load_model(path, lazy=True), out)), 48)
    ids = rng.integers(0, model.config.vocab_size, 12).tolist()
    with Session(out) as s:
        got = np.stack([s.prefill(ids[:8]), *(s.decode_step(t) for t in ids[8:])])
    want = np.stack([reference.step(t) for t in ids])[7:]
    assert_matches_reference(got, want, out, 1e-4)

    hf = compile_model(mixtral, tmp_path / "hf", CompileOptions(expert_bits=4, max_seq=48, int_dot=int_dot),
                       log=lambda m: None)
    assert hf["quantization"]["int4_grid"] == "half" and hf["quantization"]["trunk_bits"] == 8


@pytest.mark.parametrize("qtype,bits", [(Q.Q8_0, 8), (Q.Q4_0, 4)], ids=["Q8_0", "Q4_0"])
def test_an_hf_directory_rounded_as_llama_cpp_rounds_compiles_to_its_ggufs_artifact(mixtral, tmp_path, qtype, bits):
    """A GGUF with every matrix in Q8_0 or Q4_0 (as llama.cpp's gguf-py quantizes) and its HF
    directory compiled with --rounding llamacpp at those bits, experts and trunk alike: the same
    expert records and trunk tensors byte for byte (only the headers' compile ids and CRCs differ)."""
    from edgemoe.compiler.driver import CompileOptions, compile_model
    from edgemoe.compiler.expert_image import ALIGN

    path = write_gguf(mixtral, "mixtral", tmp_path / "mixtral.gguf", qtype)
    made = []
    for source, rounding in ((path, "search"), (mixtral, "llamacpp")):
        out = tmp_path / rounding
        manifest = compile_model(source, out, CompileOptions(expert_bits=bits, trunk_bits=bits, max_seq=48,
                                                             rounding=rounding), log=lambda m: None)
        assert manifest["quantization"]["int4_grid"] == ("integer" if bits == 4 else "half")
        made.append(out)
    gg, hf = made
    assert (gg / "experts.bin").read_bytes()[ALIGN:] == (hf / "experts.bin").read_bytes()[ALIGN:]
    assert (gg / "trunk.bin").read_bytes()[trunk_file.HEADER_BYTES:] == \
        (hf / "trunk.bin").read_bytes()[trunk_file.HEADER_BYTES:]


@pytest.mark.parametrize("qtype,bits", [(Q.Q4_0, 4), (Q.Q8_0, 8), (Q.F16, 8), (Q.F32, 8)],
                         ids=["Q4_0", "Q8_0", "F16", "F32"])
def test_the_trunk_bitwidth_follows_what_the_gguf_stores(mixtral, tmp_path, qtype, bits):
    """--trunk-bits auto: INT4 where every trunk matrix is stored in at most 4.5 bits per weight (Q4_0),
    else INT8; one wider matrix (the embedding in Q8_0, as llama-quantize's mixes keep the output wider)
    is enough for INT8. An HF directory's float weights: INT8."""
    from dataclasses import replace

    from edgemoe.compiler.driver import CompileOptions, trunk_bits

    path = write_gguf(mixtral, "mixtral", tmp_path / "mixtral.gguf", qtype)
    assert trunk_bits(load_model(path, lazy=True), CompileOptions()) == bits
    assert trunk_bits(load_model(mixtral, lazy=True), CompileOptions()) == 8
    assert trunk_bits(load_model(path, lazy=True), CompileOptions(trunk_bits=32)) == 32
    if qtype == Q.Q4_0:
        model = load_model(path, lazy=True)
        wider = load_model(write_gguf(mixtral, "mixtral", tmp_path / "q8.gguf", Q.Q8_0), lazy=True)
        assert trunk_bits(replace(model, embed=wider.embed), CompileOptions()) == 8


def test_llama_cpp_rounding_refuses_options_it_cannot_hold(mixtral, tmp_path):
    from edgemoe.compiler.driver import CompileOptions, compile_model

    for opts, message in ((dict(expert_bits=3), "not for INT3"), (dict(group=64), "--group 32"),
                          (dict(int4_grid="half"), "drop --int4-grid half"),
                          (dict(tolerance=0.01), "drop one of the two"), (dict(rounding="nearest"), "unknown rounding")):
        opts = {"rounding": "llamacpp", **opts}
        with pytest.raises(ValueError, match=message):
            compile_model(mixtral, tmp_path / "out", CompileOptions(max_seq=48, **opts), log=lambda m: None)
        assert not (tmp_path / "out").exists()


def test_the_estimated_search_rounds_q4_0_experts_as_the_compile_stores_them(tmp_path):
    """The bit-plan search's rounding (plan_pass.round_at_levels) of a Q4_0 GGUF's expert: at INT4 on
    the integer grid and at INT8 the GGUF's own values (the search sees no loss there, as the compile
    stores none), at INT2 a rounding."""
    from edgemoe.compiler.plan_pass import LevelTask, round_at_levels

    hf_dir = save_checkpoint("mixtral", tmp_path / "hf")
    e = load_model(write_gguf(hf_dir, "mixtral", tmp_path / "q4.gguf", Q.Q4_0), lazy=True).layers[0].experts[1]
    at = round_at_levels(LevelTask(0, 1, (e.w_gate, e.w_up, e.w_down), (2, 4, 8), 32, "integer"))
    for w, q2, q4, q8 in zip(e.matrices(), at[2].matrices(), at[4].matrices(), at[8].matrices(), strict=True):
        assert np.array_equal(q4, w.read()) and np.array_equal(q8, w.read()) and not np.array_equal(q2, w.read())


def test_bytes_read_per_token_are_top_k_experts_and_the_trunk_but_its_embedding(mixtral, tmp_path, runtime_lib):
    """What edgemoe-bench llamacpp bounds decode by: a step reads its top-k experts per layer (Q4_0 and
    INT4 alike: 4-bit codes and a float16 scale per 32 weights; the records' parts 64-byte aligned)
    and the trunk, the embedding table aside (one row) unless it is also the LM head."""
    from gguf import GGUFReader

    from edgemoe.bench import artifact_read_per_token, gguf_read_per_token
    from edgemoe.compiler.driver import CompileOptions, compile_model
    from edgemoe.compiler.trunk_file import tensor_sizes

    path = write_gguf(mixtral, "mixtral", tmp_path / "q4_0.gguf", Q.Q4_0)
    compile_model(path, tmp_path / "a", CompileOptions(expert_bits=4, max_seq=32, int_dot=False), log=lambda m: None)
    cfg = load_model(path, lazy=True).config
    routed = cfg.num_moe_layers * cfg.top_k * 3 * cfg.hidden_size * cfg.expert_intermediate * 18 / 32
    sizes = tensor_sizes(tmp_path / "a" / "trunk.bin")
    unread = ["program", "rope_cos", "rope_sin"] + (["embed", "embed.scales"] if "lm_head" in sizes else [])
    trunk = sum(sizes.values()) - sum(sizes[n] for n in unread)
    ours = artifact_read_per_token(tmp_path / "a")
    assert routed + trunk <= ours <= routed + trunk + cfg.num_moe_layers * cfg.top_k * 6 * 64
    tensors = GGUFReader(path).tensors
    tied = not any(t.name == "output.weight" for t in tensors)
    theirs = sum(int(t.n_bytes) for t in tensors if "_exps." not in t.name and (tied or t.name != "token_embd.weight"))
    assert gguf_read_per_token(path, cfg.top_k, cfg.num_experts) == pytest.approx(routed + theirs)
