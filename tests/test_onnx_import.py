"""ONNX import (models/onnx_import.py): each supported family's tiny checkpoint exported with
torch.onnx (edgemoe.onnx_reference.export: the dynamo exporter, batched-matmul experts, weights in
external data) imports from its graph to the same MoEModel as the Hugging Face directory, exactly;
compiled, it gives the HF directory's expert image and trunk byte for byte (but for the compile id)
and the same greedy tokens. Strictness: operators, op patterns, weights and constants the importer
does not recognise, a config.json that disagrees with the graph, a missing config.json, damaged
files and other families are refused naming the problem. One export per family per session, shared
with test_onnx_reference.py (conftest's onnx_exports; an export takes ~10 s): three families of
distinct structure in CI, OLMoE and a dense layer in the slow run."""
from __future__ import annotations

import json
import shutil
from dataclasses import fields, is_dataclass
from pathlib import Path

import numpy as np
import pytest

from edgemoe.models import ModelImportError, describe_model, load_model
from edgemoe.models.onnx_import import FAMILIES
from edgemoe.models.stored_tensor import StoredTensor, materialize

from crafted import IMAGE_FIELDS, TRUNK_FIELDS

onnx = pytest.importorskip("onnx")

# plain; shared gated expert, q/k/v biases, no renormalisation; per-head q/k norms, renormalised top-4 of 16
CI_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")


def assert_same_model(a, b, where="model"):
    """Every array of two models (or their parts) equal, read where stored; the same fields None."""
    if is_dataclass(a):
        for f in fields(a):
            assert_same_model(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_model(x, y, f"{where}[{i}]")
    elif isinstance(a, (np.ndarray, StoredTensor)):
        x, y = materialize(a), materialize(b)
        assert x.shape == y.shape and np.array_equal(x, y), where
    else:
        assert a == b, where


@pytest.mark.parametrize("family", [f if f in CI_FAMILIES else pytest.param(f, marks=pytest.mark.slow)
                                    for f in FAMILIES])
def test_an_onnx_export_imports_the_hf_checkpoints_model_exactly(onnx_exports, family):
    hf, exported = onnx_exports(family)
    want = load_model(hf)
    got = load_model(exported / "model.onnx")
    assert got.config == want.config == describe_model(exported)
    assert_same_model(got, want)
    # the streaming compile's import: experts stay in the external data file, read when used
    lazy = load_model(exported, lazy_experts=True)
    e = lazy.layers[-1].experts[-1]
    assert all(isinstance(w, StoredTensor) and w.path == exported / "model.onnx.data" for w in e.matrices())
    assert_same_model(lazy.layers[-1].experts, want.layers[-1].experts)


@pytest.mark.slow
def test_dense_layers_import_and_are_checked_against_the_config(onnx_exports, tmp_path):
    hf, exported = onnx_exports("qwen2_moe", mlp_only_layers=[0])
    model = load_model(exported)
    assert model.layers[0].dense is not None and model.config.dense_layers == (0,)
    assert_same_model(model, load_model(hf))
    changed = Path(shutil.copytree(exported, tmp_path / "onnx"))
    edit_config(changed, mlp_only_layers=[])
    refused(changed, "layer 0: the graph has a dense MLP", "implies an MoE block")


def without_compile_id(path: Path, fmt: str, names: tuple) -> bytes:
    """A trunk.bin or experts.bin with its header's compile id zeroed and CRC dropped (every compile
    draws its own id: docs/FORMAT.md)."""
    from edgemoe.compiler.binfmt import pack, size, unpack

    data = path.read_bytes()
    header = dict(zip(names, unpack(fmt, data)))
    header["compile_id"] = bytes(16)
    return pack(fmt, *(header[n] for n in names)) + data[size(fmt) + 4:]


@pytest.fixture(scope="session")
def compiled(onnx_exports, tiny_with_tokenizer, tmp_path_factory, runtime_lib):
    """Mixtral compiled from its HF directory and, by `edgemoe-compile MODEL.onnx`, from its ONNX
    export, each with the same tokenizer.json beside it."""
    from click.testing import CliRunner

    from edgemoe.cli import compile_cmd
    from edgemoe.compiler.driver import CompileOptions, compile_model

    out = tmp_path_factory.mktemp("onnx_import_artifacts")
    for name, src in zip(("hf", "onnx"), onnx_exports("mixtral")):
        shutil.copytree(src, out / f"{name}_model")
        shutil.copy(tiny_with_tokenizer / "tokenizer.json", out / f"{name}_model" / "tokenizer.json")
    compile_model(out / "hf_model", out / "hf", CompileOptions(expert_bits=4, max_seq=48), log=lambda m: None)
    r = CliRunner().invoke(compile_cmd, [str(out / "onnx_model" / "model.onnx"), "-o", str(out / "onnx"),
                                         "--bits", "4", "--max-seq", "48"])
    assert r.exit_code == 0, (r.output, r.exception)
    return out / "hf", out / "onnx"


def test_an_onnx_export_compiles_to_the_hf_directorys_artifact(compiled, rng):
    from edgemoe.compiler import expert_image, trunk_file
    from edgemoe.runtime import Session

    hf, ox = compiled
    for name, fmt, names in (("experts.bin", expert_image.HEADER_FMT, IMAGE_FIELDS),
                             ("trunk.bin", trunk_file.HEADER_FMT, TRUNK_FIELDS)):
        assert without_compile_id(ox / name, fmt[:-1], names) == without_compile_id(hf / name, fmt[:-1], names), name
    assert (ox / "tokenizer.json").read_bytes() == (hf / "tokenizer.json").read_bytes()
    prompt = rng.integers(0, 160, 6).tolist()
    with Session(hf) as a, Session(ox) as b:
        assert b.generate(prompt, 12) == a.generate(prompt, 12)


@pytest.fixture
def mixtral_onnx(onnx_exports, tmp_path):
    """A copy of Mixtral's export to alter."""
    _, exported = onnx_exports("mixtral")
    return Path(shutil.copytree(exported, tmp_path / "onnx"))


def edit_graph(d: Path, change) -> Path:
    """Rewrites d/model.onnx with change(graph) applied (the external data stays as it is)."""
    path = d / "model.onnx"
    model = onnx.load(str(path), load_external_data=False)
    change(model.graph)
    onnx.save(model, str(path))
    return path


def node(graph, op: str, module: str, nth: int = 0):
    """The nth node of type `op` that torch.onnx recorded in `module` (the last but one of its name scopes)."""
    def module_of(n):
        scopes = next(p.value for p in n.metadata_props if p.key == "pkg.torch.onnx.name_scopes")
        return json.loads(scopes.replace("'", '"'))[-2]

    return [n for n in graph.node if n.op_type == op and module_of(n) == module][nth]


def edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def refused(path: Path, *words: str) -> str:
    with pytest.raises(ModelImportError) as e:
        load_model(path)
    message = str(e.value)
    for w in words:
        assert w in message, message
    return message


def test_an_operator_outside_the_recognised_ones_is_refused_naming_it(mixtral_onnx):
    def tanh_experts(g):  # the experts' SiLU made tanh-based
        node(g, "Sigmoid", "model.model.layers.1.mlp.experts.act_fn").op_type = "Tanh"

    refused(edit_graph(mixtral_onnx, tanh_experts), "operator Tanh", "model.model.layers.1.mlp.experts")


def test_routing_other_than_the_familys_is_refused(mixtral_onnx):
    def topk_of_logits(g):  # TopK straight on the router's logits, the softmax left unused
        soft = node(g, "Softmax", "model.model.layers.0.mlp.gate")
        topk = node(g, "TopK", "model.model.layers.0.mlp.gate")
        topk.input[0] = soft.input[0]

    refused(edit_graph(mixtral_onnx, topk_of_logits), "layer 0", "router → Softmax → TopK", "TopK node")


@pytest.mark.parametrize("value", [np.full(64, 0.5, np.float32), np.float32(0.5)], ids=["vector", "scalar"])
def test_a_weight_or_constant_no_block_takes_is_refused_naming_it(mixtral_onnx, value):
    from onnx import helper, numpy_helper

    def scaled_moe(g):  # layer 1's MoE output multiplied by an extra initializer
        add = node(g, "Add", "model.model.layers.1", nth=-1)  # the feed-forward residual
        g.initializer.append(numpy_helper.from_array(np.asarray(value), "extra_scale"))
        g.node.insert(list(g.node).index(add), helper.make_node("Mul", [add.input[1], "extra_scale"], ["scaled_moe"]))
        add.input[1] = "scaled_moe"

    kind = "weight" if np.ndim(value) else "float constant"
    refused(edit_graph(mixtral_onnx, scaled_moe), f"{kind} 'extra_scale'", "not part of any block")


@pytest.mark.parametrize("key, value, words", [
    ("num_hidden_layers", 3, ("number of decoder layers", "the graph has 2", "implies 3")),
    ("num_experts_per_tok", 3, ("TopK k", "the graph has 2", "num_experts_per_tok = 3")),
    ("num_local_experts", 8, ("expert count", "the graph has 4", "num_experts = 8")),
    ("intermediate_size", 64, ("expert weights",)),
    ("num_key_value_heads", 4, ("k projection",)),
    ("rms_norm_eps", 1e-5, ("norm's ε",)),
    ("rope_parameters", {"rope_type": "default", "rope_theta": 500000.0}, ("RoPE's frequencies",)),
], ids=lambda v: v if isinstance(v, str) else None)
def test_a_config_that_disagrees_with_the_graph_is_refused(mixtral_onnx, key, value, words):
    edit_config(mixtral_onnx, **{key: value})
    message = refused(mixtral_onnx / "model.onnx", *words)
    assert "config.json beside it implies" in message


def test_a_missing_config_says_what_to_provide(mixtral_onnx):
    (mixtral_onnx / "config.json").unlink()
    refused(mixtral_onnx / "model.onnx", "config.json not found", "Hugging Face config.json",
            "the checkpoint it was exported from")


def test_other_families_are_refused_by_name(mixtral_onnx):
    edit_config(mixtral_onnx, architectures=["PhimoeForCausalLM"])
    refused(mixtral_onnx, "'PhimoeForCausalLM'", "supported: MixtralForCausalLM, OlmoeForCausalLM, "
            "Qwen2MoeForCausalLM, Qwen3MoeForCausalLM")


def test_damaged_files_are_refused(mixtral_onnx):
    path, data = mixtral_onnx / "model.onnx", mixtral_onnx / "model.onnx.data"
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    refused(path, "not a readable ONNX file", "export it again")
    path.write_bytes(whole)
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size - 100)
    refused(path, "model.onnx.data", "truncated or missing external data file")


def test_weights_inside_the_onnx_file_import_too(mixtral_onnx, onnx_exports, tmp_path):
    """An export small enough to hold its weights in the .onnx itself (external_data=False)."""
    inline = tmp_path / "inline"
    inline.mkdir()
    onnx.save(onnx.load(str(mixtral_onnx / "model.onnx")), str(inline / "model.onnx"))
    shutil.copy(mixtral_onnx / "config.json", inline / "config.json")
    assert not (inline / "model.onnx.data").exists()
    assert_same_model(load_model(inline / "model.onnx"), load_model(onnx_exports("mixtral")[0]))


def test_which_files_are_an_onnx_model(mixtral_onnx, onnx_exports):
    hf, _ = onnx_exports("mixtral")
    assert load_model(mixtral_onnx).config == load_model(hf).config  # a directory holding one .onnx
    shutil.copy(mixtral_onnx / "model.onnx", mixtral_onnx / "other.onnx")
    refused(mixtral_onnx, "holds 2 .onnx files", "name the one to import")
    with pytest.raises(ModelImportError, match="not found"):
        load_model(mixtral_onnx / "missing.onnx")
