"""The tuning store: records are made once per target and shape, reused by later compiles, and
kept apart per target."""
from __future__ import annotations

import json

import pytest

from edgemoe.compiler.driver import CompileOptions, compile_model
from edgemoe.compiler.kernels import decode_kernels
from edgemoe.compiler.tuning import TuningError, TuningStore, kernel_key, tunable, tune
from edgemoe.models import load_model
from edgemoe.targets import load_target


@pytest.fixture(scope="module")
def tuned_store(tiny_mixtral_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("tuning")
    funcs = decode_kernels(load_model(tiny_mixtral_dir).config, [4], 32)
    store = TuningStore(load_target("host"), root)
    tuned = tune(funcs, store.target, store, candidates=(8, 16), number=5)
    return root, funcs, tuned


def test_every_matvec_kernel_gets_a_record_with_its_timings(tuned_store):
    root, funcs, tuned = tuned_store
    names = set(tunable(funcs))
    assert {"em_qkv", "em_lm_head", "em_expert_gate_up_w4", "em_expert_down_w4"} <= names
    assert "em_attention" not in names  # symbolic context length: not in the search
    assert set(tuned) == names
    records = json.loads(TuningStore(load_target("host"), root).path.read_text())
    for n in names:
        rec = records[kernel_key(n, funcs[n])]
        assert rec["lanes"] in (8, 16) and set(rec["candidates_us"]) == {"8", "16"}
        assert rec["us"] == min(rec["candidates_us"].values())


def test_second_compile_reuses_records_without_tuning(tiny_mixtral_dir, tuned_store, tmp_path, runtime_lib):
    root, _, _ = tuned_store
    store_file = TuningStore(load_target("host"), root).path
    before = store_file.read_bytes()
    opts = CompileOptions(expert_bits=4, max_seq=32, tune=True, tuning_dir=root)
    manifest = compile_model(tiny_mixtral_dir, tmp_path / "art", opts, log=lambda m: None)
    sources = {v["from"] for v in manifest["kernels"]["schedules"].values()}
    assert sources == {"tuning record"}
    assert store_file.read_bytes() == before


def test_other_target_is_refused_and_leaves_the_host_store_alone(tuned_store):
    root, funcs, _ = tuned_store
    host_file = TuningStore(load_target("host"), root).path
    before = host_file.read_bytes()
    rpi = TuningStore(load_target("rpi4"), root)
    assert rpi.path != host_file
    with pytest.raises(TuningError, match="tune on the device"):
        tune(funcs, rpi.target, rpi)
    assert host_file.read_bytes() == before and not rpi.path.exists()


def test_a_changed_shape_is_not_served_by_an_old_record(tiny_mixtral_dir, tuned_store):
    root, funcs, _ = tuned_store
    store = TuningStore(load_target("host"), root)
    other = decode_kernels(load_model(tiny_mixtral_dir).config, [8], 32)
    assert store.lanes(kernel_key("em_expert_down_w8", other["em_expert_down_w8"])) is None
    assert store.lanes(kernel_key("em_expert_down_w4", funcs["em_expert_down_w4"])) is not None
