"""Tuning through TVM RPC: a tracker and two RPC servers on loopback time the kernels of a tiny
model in parallel (both boards busy at once), and the following compile takes every schedule from
the records without timing anything; an aarch64 board without Python (the popen RPC server, run
under qemu-aarch64) completes a tuning round whose record a Raspberry Pi 5 compile uses. Timings
under qemu mean nothing: the flow, the records and their reuse are what is checked."""
from __future__ import annotations

import json
import time

import pytest
from click.testing import CliRunner

from edgemoe.cli import tune_cmd
from edgemoe.compiler import measure
from edgemoe.compiler.driver import CompileOptions, compile_model
from edgemoe.compiler.kernels import decode_kernels
from edgemoe.compiler.tuning import TuningStore, kernel_key, tunable, tune
from edgemoe.models import load_model
from edgemoe.runtime import REPO_ROOT
from edgemoe.targets import load_target, toolchain

KEY = "edgemoe-test"
ARM_TVM_RUNTIME = REPO_ROOT / "build" / "tvm-runtime-aarch64"


@pytest.fixture(scope="module")
def tracker_with_two_boards():
    from tvm import rpc
    from tvm.rpc.tracker import Tracker

    tracker = Tracker(host="127.0.0.1", port=19190, port_end=19290, silent=True)
    servers = [rpc.Server(host="127.0.0.1", port=19300, port_end=19400, key=KEY,
                          tracker_addr=("127.0.0.1", tracker.port), silent=True) for _ in range(2)]
    client = rpc.connect_tracker("127.0.0.1", tracker.port)
    deadline = time.time() + 60
    while sum(s["key"].endswith(f":{KEY}") for s in client.summary()["server_info"]) < 2:
        assert time.time() < deadline, client.text_summary()
        time.sleep(0.2)
    yield f"127.0.0.1:{tracker.port}"
    for s in servers:
        s.terminate()
    tracker.terminate()


def test_two_boards_tune_in_parallel_and_the_compile_reuses_the_records(tracker_with_two_boards, tiny_mixtral_dir,
                                                                       tmp_path, runtime_lib):
    host = load_target("host")
    funcs = decode_kernels(load_model(tiny_mixtral_dir).config, [4], 32, layout="rows")
    store = TuningStore(host, tmp_path / "store")
    farm = measure.Remote(tracker=tracker_with_two_boards, key=KEY, number=5)
    assert farm.boards == 2
    tuned = tune(funcs, host, store, candidates=(8, 16), measurer=farm)
    assert set(tuned) == set(tunable(funcs)) and len(tuned) >= 4
    assert len(farm.sessions_used) == 2 and all(n > 0 for n in farm.sessions_used), farm.sessions_used
    assert sum(farm.sessions_used) == len(tuned)
    for name in tunable(funcs):
        rec = store.records[kernel_key(name, funcs[name])]
        assert rec["measured_on"] == f"tracker {tracker_with_two_boards} key {KEY}"
        assert set(rec["candidates_us"]) == {"lanes=8", "lanes=16"}
        assert rec["us"] == min(rec["candidates_us"].values()) > 0

    before = store.path.read_bytes()
    opts = CompileOptions(expert_bits=4, max_seq=32, int_dot=False, tune=True, tuning_dir=store.path.parent)
    manifest = compile_model(tiny_mixtral_dir, tmp_path / "art", opts, log=lambda m: None)
    schedules = manifest["kernels"]["schedules"]
    assert set(schedules) == set(tuned)
    for name, s in schedules.items():
        assert s == {"schedule": tuned[name], "from": "tuning record", "measured_on": farm.where}, (name, s)
    assert store.path.read_bytes() == before  # nothing timed again


def test_edgemoe_tune_through_the_tracker_and_one_server(tracker_with_two_boards, tiny_mixtral_dir, tmp_path):
    from tvm import rpc

    short = ["--bits", "4", "--no-int-dot", "--lanes", "8,16", "--number", "5"]
    r = CliRunner().invoke(tune_cmd, [str(tiny_mixtral_dir), "--rpc-tracker", tracker_with_two_boards, "--rpc-key", KEY,
                                      *short, "--store", str(tmp_path / "farm")])
    assert r.exit_code == 0, r.output
    assert f"timed on tracker {tracker_with_two_boards} key {KEY}" in r.output
    assert "| em_expert_down_w4 |" in r.output
    board = rpc.Server(host="127.0.0.1", port=19500, port_end=19600, silent=True)  # one board, no tracker
    try:
        r = CliRunner().invoke(tune_cmd, [str(tiny_mixtral_dir), "--rpc", f"127.0.0.1:{board.port}", *short,
                                          "--store", str(tmp_path / "one")])
    finally:
        board.terminate()
    assert r.exit_code == 0, r.output
    assert f"6 kernels tuned now, timed on rpc 127.0.0.1:{board.port}" in r.output, r.output
    r = CliRunner().invoke(tune_cmd, [str(tiny_mixtral_dir), "--rpc-tracker", tracker_with_two_boards, "--rpc-key",
                                      "no-such-board", "--store", str(tmp_path)])
    assert r.exit_code == 1 and "lists no board with key 'no-such-board'" in r.output, r.output
    r = CliRunner().invoke(tune_cmd, [str(tiny_mixtral_dir), "--rpc", "nowhere", "--store", str(tmp_path)])
    assert r.exit_code == 1 and "--rpc 'nowhere' is not HOST:PORT" in r.output, r.output


def test_an_aarch64_board_without_python_completes_a_tuning_round_under_qemu(tiny_mixtral_dir, tmp_path):
    rpi5 = load_target("rpi5")
    try:
        launcher = list(toolchain.emulator(rpi5).prefix)
        cxx = toolchain.require_program("aarch64-linux-gnu-g++", "the C++ compiler for the board's RPC server")
        board = measure.MinRPC(ARM_TVM_RUNTIME, launcher, cxx, number=3, repeat=1)
    except (toolchain.ToolchainError, measure.MeasureError) as e:
        pytest.fail(str(e))
    funcs = decode_kernels(load_model(tiny_mixtral_dir).config, [4], 32, layout="rows", target=rpi5.tvm())
    store = TuningStore(rpi5, tmp_path / "store")
    one = {"em_expert_down_w4": funcs["em_expert_down_w4"]}  # one round: one kernel, two candidates
    tuned = tune(one, rpi5, store, candidates=(8, 16), measurer=board)
    rec = store.records[kernel_key("em_expert_down_w4", one["em_expert_down_w4"])]
    assert tuned == {"em_expert_down_w4": rec["schedule"]} and rec["measured_on"].startswith("popen RPC server via ")
    assert "qemu-aarch64" in rec["measured_on"] and rec["cpu"] == "cortex-a76"
    assert set(rec["candidates_us"]) == {"lanes=8", "lanes=16"} and all(v > 0 for v in rec["candidates_us"].values())

    manifest = compile_model(tiny_mixtral_dir, tmp_path / "art", CompileOptions(
        target="rpi5", expert_bits=4, max_seq=32, int_dot=False, tuning_dir=store.path.parent), log=lambda m: None)
    schedules = manifest["kernels"]["schedules"]
    assert schedules["em_expert_down_w4"] == {"schedule": rec["schedule"], "from": "tuning record",
                                              "measured_on": rec["measured_on"]}
    assert {s["from"] for n, s in schedules.items() if n != "em_expert_down_w4"} == {"default"}
    assert json.loads((tmp_path / "art" / "manifest.json").read_text())["kernels"]["schedules"] == schedules
