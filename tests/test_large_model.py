"""The large-model bench's parts: random checkpoints of published shapes (names and shapes as
transformers writes them, read back by transformers and by the strict importer) and RAM caps the
kernel enforces."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from edgemoe.memcap import MemCapError, run_capped
from edgemoe.models import load_model
from edgemoe.models.random_checkpoint import SHAPES, write

SMALL = dict(hidden_size=64, intermediate_size=32, vocab_size=4096, num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_random_checkpoint_is_what_transformers_writes(tmp_path, shape):
    import torch
    import transformers

    extra = {"moe_intermediate_size": 16, "head_dim": 16} if shape == "qwen3-30b-a3b" else {}
    experts = "num_local_experts" if shape == "mixtral-8x7b" else "num_experts"
    n = write(tmp_path, shape, layers=2, seed=3, **SMALL, **extra, **{experts: 4})
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and cfg["architectures"] == [SHAPES[shape][1]]
    model, info = getattr(transformers, SHAPES[shape][1]).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert sum(p.numel() for p in model.parameters()) == n
    ours = load_model(tmp_path)  # the strict importer: every tensor understood
    gate = ours.layers[1].experts[3].w_gate
    assert gate.shape[1] == 64 and 0.015 < float(np.std(gate)) < 0.025  # initializer_range 0.02
    assert np.all(np.asarray(ours.layers[0].attn_norm) == 1)


def test_random_checkpoint_refuses_an_unknown_shape(tmp_path):
    with pytest.raises(ValueError, match="unknown shape 'gpt-5'"):
        write(tmp_path, "gpt-5")


def _cap_or_skip(cmd, cap, timeout=None):
    try:
        return run_capped(cmd, cap, timeout=timeout)
    except MemCapError as e:
        pytest.skip(f"no memory cgroup here: {e}")


def test_a_run_within_its_cap_reports_its_peak():
    held = "import time; b = bytearray(200 << 20); b[::4096] = b'x' * len(b[::4096]); time.sleep(1); print('ok')"
    r = _cap_or_skip([sys.executable, "-c", held], 1 << 30)  # held a second: the resident peak is sampled
    assert r.returncode == 0 and r.stdout.strip() == "ok"
    assert 200 << 20 <= r.peak_bytes <= 1 << 30 and r.max_rss_bytes >= 200 << 20
    assert 150 << 20 <= r.peak_anon_bytes <= r.peak_bytes


def test_the_kernel_stops_a_run_over_its_cap():
    r = _cap_or_skip([sys.executable, "-c", "b = bytearray(600 << 20); b[::4096] = b'x' * len(b[::4096])"], 300 << 20)
    assert r.returncode == -9 and r.peak_bytes <= 300 << 20


def test_a_run_past_its_timeout_is_killed_and_says_so():
    r = _cap_or_skip([sys.executable, "-c", "import time; time.sleep(30)"], 1 << 30, 1)
    assert r.timed_out and r.returncode == -9 and r.wall_s < 20

