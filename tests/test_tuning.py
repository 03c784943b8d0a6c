"""The tuning store: records are made once per target and shape, reused by later compiles, and
kept apart per target; the integer-dot kernels' knobs are searched like the float kernels' lanes."""
from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import assert_matches_reference

from edgemoe.compiler import int_dot
from edgemoe.compiler.artifact_reference import artifact_model
from edgemoe.compiler.driver import CompileOptions, compile_model
from edgemoe.compiler.kernels import decode_kernels
from edgemoe.compiler.measure import Local, MeasureError, last_level_cache_bytes, local_measurer
from edgemoe.compiler.tuning import TuningError, TuningStore, kernel_key, label, tunable, tune
from edgemoe.models import load_model
from edgemoe.models.reference import ReferenceExecutor
from edgemoe.runtime import Session
from edgemoe.targets import load_target

# a short search: two knobs of two values each, two rounds (hand schedule, its two neighbours, then
# the neighbours of a better one)
SHORT_SPACE = {"chains": (1, 2), "tiles": (1, 2)}
INT_DOT_KERNELS = {"em_qkv", "em_o_proj", "em_lm_head", "em_expert_gate_up_w4", "em_expert_down_w4"}


def compile_kernels(cfg, bits):
    """The kernels edgemoe-compile builds for the host (the tiny model fits the tiles layout: integer-dot
    kernels, the router a float one), with the integer-dot ones' builders."""
    variants = {}
    funcs = decode_kernels(cfg, bits, 32, 8, layout="tiles", target=load_target("host").tvm(), variants=variants)
    return funcs, variants


@pytest.fixture(scope="module")
def tuned_store(tiny_mixtral_dir, tmp_path_factory):
    if int_dot.isa_for(load_target("host").tvm()) is None:
        pytest.skip("this CPU has no int8 dot product: the compile would not use integer-dot kernels")
    root = tmp_path_factory.mktemp("tuning")
    funcs, variants = compile_kernels(load_model(tiny_mixtral_dir).config, [4])
    store = TuningStore(load_target("host"), root)
    tuned = tune(funcs, store.target, store, candidates=(8, 16), number=5, variants=variants,
                 int_dot_space=SHORT_SPACE, rounds=2)
    return root, funcs, variants, tuned


def test_every_matvec_kernel_gets_a_record_with_its_timings(tuned_store):
    root, funcs, variants, tuned = tuned_store
    names = set(tunable(funcs, variants))
    assert names == INT_DOT_KERNELS | {"em_router"}
    assert "em_attention" not in names  # symbolic context length: not in the search
    assert set(tuned) == names
    records = json.loads(TuningStore(load_target("host"), root).path.read_text())
    for n in names:
        rec = records[kernel_key(n, funcs[n])]
        assert rec["schedule"] == tuned[n] and rec["us"] <= rec["default_us"]
        # the fastest candidate (times are rounded to ns in the record: several may tie)
        fastest = {k for k, us in rec["candidates_us"].items() if us == min(rec["candidates_us"].values())}
        if n == "em_router":  # one knob: every candidate timed once, side by side
            assert set(rec["candidates_us"]) == {"lanes=8", "lanes=16"} and label(rec["schedule"]) in fastest
            assert rec["us"] == rec["candidates_us"][label(rec["schedule"])] and rec["default_us"] == rec["candidates_us"]["lanes=16"]
            continue
        hand = asdict(int_dot.knobs_of(funcs[n]))
        assert {label(hand), label({**hand, "chains": 1}), label({**hand, "tiles": 2})} <= set(rec["candidates_us"])
        assert len(rec["candidates_us"]) <= 4  # two rounds over a 2×2 space
        # the search's fastest, if it beat the hand schedule again when timed beside it; else the hand one
        assert label(rec["schedule"]) in {label(hand), *fastest}, rec
        if rec["schedule"] == hand:
            assert rec["us"] == rec["default_us"]


def test_second_compile_reuses_records_without_tuning(tiny_mixtral_dir, tuned_store, tmp_path, runtime_lib):
    root, _, _, tuned = tuned_store
    store_file = TuningStore(load_target("host"), root).path
    before = store_file.read_bytes()
    opts = CompileOptions(expert_bits=4, max_seq=32, tune=True, tuning_dir=root)
    manifest = compile_model(tiny_mixtral_dir, tmp_path / "art", opts, log=lambda m: None)
    schedules = manifest["kernels"]["schedules"]
    assert set(schedules) == set(tuned)
    for name, s in schedules.items():
        assert s == {"schedule": tuned[name], "from": "tuning record", "measured_on": "this machine"}, name
    assert store_file.read_bytes() == before


def test_other_target_is_refused_and_leaves_the_host_store_alone(tiny_mixtral_dir, tuned_store):
    root, _, _, _ = tuned_store
    host_file = TuningStore(load_target("host"), root).path
    before = host_file.read_bytes()
    rpi = TuningStore(load_target("rpi4"), root)
    assert rpi.path != host_file
    funcs = decode_kernels(load_model(tiny_mixtral_dir).config, [4], 32)
    with pytest.raises(TuningError, match="tune on the device"):
        tune(funcs, rpi.target, rpi)
    assert host_file.read_bytes() == before and not rpi.path.exists()


def test_a_changed_shape_is_not_served_by_an_old_record(tiny_mixtral_dir, tuned_store):
    root, funcs, _, _ = tuned_store
    store = TuningStore(load_target("host"), root)
    other, _ = compile_kernels(load_model(tiny_mixtral_dir).config, [8])
    assert store.schedule(kernel_key("em_expert_down_w8", other["em_expert_down_w8"])) is None
    assert store.schedule(kernel_key("em_expert_down_w4", funcs["em_expert_down_w4"])) is not None


@pytest.mark.slow
def test_edgemoe_tune_searches_the_whole_space_at_every_bitwidth(tiny_mixtral_dir, tmp_path):
    """The full search (every knob, the default rounds) of every kernel of a compile at INT2/3/4/8:
    a record per kernel, none slower than the hand schedule as measured, and a second run tunes nothing."""
    from edgemoe.cli import tune_cmd

    args = [str(tiny_mixtral_dir), "--bits", "2,3,4,8", "--number", "10", "--store", str(tmp_path)]
    r = CliRunner().invoke(tune_cmd, args)
    assert r.exit_code == 0, r.output
    assert "| em_expert_gate_up_w3 |" in r.output
    store = TuningStore(load_target("host"), tmp_path)
    funcs, variants = compile_kernels(load_model(tiny_mixtral_dir).config, [2, 3, 4, 8])
    assert {r["cpu"] for r in store.records.values()} == {load_target("host").resolved_tvm_target()["mcpu"]}
    for n in tunable(funcs, variants):
        rec = store.records[kernel_key(n, funcs[n])]
        assert rec["us"] <= rec["default_us"]
    before = store.path.read_bytes()
    r = CliRunner().invoke(tune_cmd, args)
    assert r.exit_code == 0 and "0 kernels tuned now" in r.output, r.output
    assert store.path.read_bytes() == before


def test_recorded_knobs_reach_the_artifact_and_its_logits_match_the_reference(tiny_mixtral_dir, tmp_path, rng,
                                                                             runtime_lib):
    """Records giving every integer-dot kernel of a compile knobs off the hand schedule (as many as
    its shape takes): the manifest reports them, and the C runtime's logits, on two threads, match
    the NumPy reference as with the hand schedule."""
    host = load_target("host")
    isa = int_dot.isa_for(host.tvm())
    if isa is None:
        pytest.skip("this CPU has no int8 dot product: the compile would not use integer-dot kernels")
    funcs, variants = compile_kernels(load_model(tiny_mixtral_dir).config, [4])
    store = TuningStore(host, tmp_path / "store")
    chosen = {}
    for n in variants:
        hand = int_dot.knobs_of(funcs[n])
        for unroll, fuse in ((2, True), (2, False), (1, True), (1, False)):  # the most this kernel takes
            knobs = int_dot.Knobs(chains=4, tiles=2, unroll=unroll, fuse=fuse, prefetch=8, parallel=not hand.parallel)
            try:
                variants[n](knobs)
            except ValueError:
                continue
            chosen[n] = asdict(knobs)
            store.put(kernel_key(n, funcs[n]), {"schedule": chosen[n], "measured_on": "written by the test"})
            break
    assert set(chosen) == INT_DOT_KERNELS
    art = tmp_path / "art"
    manifest = compile_model(tiny_mixtral_dir, art, CompileOptions(expert_bits=4, max_seq=64,
                                                                   tuning_dir=store.path.parent), log=lambda m: None)
    for n, knobs in chosen.items():
        assert manifest["kernels"]["schedules"][n] == {"schedule": knobs, "from": "tuning record",
                                                       "measured_on": "written by the test"}
    ref = ReferenceExecutor(artifact_model(load_model(tiny_mixtral_dir), art), 64)
    tokens = rng.integers(0, 160, 32).tolist()
    want = np.stack([ref.step(t) for t in tokens])
    with Session(art, threads=2) as s:
        got = np.stack([s.decode_step(t) for t in tokens])
    assert_matches_reference(got, want, art, 1e-4)


def test_a_store_of_lane_records_from_before_the_knobs_still_serves_them(tmp_path):
    store = TuningStore(load_target("host"), tmp_path)
    store.path.write_text(json.dumps({"em_router(float32[4x64],float32[64],float32[4])": {"lanes": 8, "us": 1.0}}))
    assert TuningStore(load_target("host"), tmp_path).schedule("em_router(float32[4x64],float32[64],float32[4])") == \
        {"lanes": 8}


def test_kernels_of_a_model_larger_than_the_cache_are_timed_with_cold_caches(tiny_mixtral_dir, tmp_path):
    """Where a model's weights exceed the last-level cache, decode streams them from memory: the
    measurer then times each call on copies of its arguments spanning twice that cache."""
    llc = last_level_cache_bytes()
    assert local_measurer(llc // 2).cold_bytes == 0 and local_measurer(llc // 2, caches="cold").cold_bytes == 2 * llc
    assert local_measurer(2 * llc).cold_bytes == 2 * llc and local_measurer(2 * llc, caches="warm").cold_bytes == 0
    with pytest.raises(MeasureError, match="auto, cold or warm"):
        local_measurer(0, caches="hot")
    funcs, variants = compile_kernels(load_model(tiny_mixtral_dir).config, [4])
    one = {"em_expert_down_w4": funcs["em_expert_down_w4"]}
    store = TuningStore(load_target("host"), tmp_path)
    tuned = tune(one, store.target, store, number=5, variants=variants, int_dot_space=SHORT_SPACE, rounds=1,
                 measurer=Local(5, cold_bytes=4 << 20))
    rec = store.records[kernel_key("em_expert_down_w4", one["em_expert_down_w4"])]
    assert rec["schedule"] == tuned["em_expert_down_w4"] and rec["measured_on"] == "this machine, caches cold"
    assert all(0 < us < 1e5 for us in rec["candidates_us"].values()) and rec["us"] <= rec["default_us"]
