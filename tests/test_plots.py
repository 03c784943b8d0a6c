"""Every edgemoe-bench subcommand draws its table into a PNG (python/edgemoe/plots.py): the charts
from plain rows, and the subcommands end to end on small inputs."""
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgemoe import plots
from edgemoe.bench import bench_cmd

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path, min_bytes=8000):
    """A PNG (magic, IHDR of a chart-sized image) with more in it than a blank canvas."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, data[:16]
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 300 and height >= 200, (width, height)
    assert len(data) >= min_bytes, len(data)


def assert_wrote(result, path):
    assert result.exit_code == 0, (result.output, result.exception)
    assert f"wrote {path}" in result.stderr, result.stderr
    assert_png(path)


# ------------------------------------------------------------------------------------- charts alone

def test_every_chart_draws_its_rows(tmp_path):
    pipeline = [{"config": "IO-FREE (all experts resident)", "ms_per_token": 0.2, "floor_ms": 0.2}] + \
        [{"config": f"cache 25%, configuration {i}", "ms_per_token": 30.0 + i, "floor_ms": 20.0 + i} for i in range(4)]
    charts = {
        "pipeline": (pipeline,),
        "predictors": ([{"predictor": "none", "count": 2, "predicted": None, "hit_rate": 0.4},
                        {"predictor": "next-router", "count": 2, "predicted": 0.8, "hit_rate": 0.7}],),
        "kernels": ([{"kernel": "down", "shape": "256×320", "bits": b, "formulation": f, "us": 3.0 * b,
                      "gbps": 10.0 + b} for b in (4, 8) for f in ("float dequant", "int8 dot")], 18.0),
        "bitplans": ([{"plan": f"uniform INT{b}", "average_bits": b, "searched": False, "loss_pct": [l]}
                      for b, l in ((8, 0.1), (4, 1.5), (3, 6.0), (2, 45.0))] +
                     [{"plan": "tolerance 1%", "average_bits": 3.6, "searched": True, "loss_pct": [0.9]}],
                     ["held_out.txt"]),
        "budget": ([{"artifact": "a", "average_bits": 4.0, "ms_per_token": 30.0, "hit_rate": 0.5, "cache_slots": 12},
                    {"artifact": "b", "average_bits": 3.0, "ms_per_token": 22.0, "hit_rate": 0.7,
                     "cache_slots": 17}],),
        "llamacpp": ([{"label": "INT4 / Q4_0\n1 thread", "ours": 900.0, "theirs": 450.0}],),
        "sweep": ([{"config": "IO-FREE", "fraction": None, "ms_per_token": 0.2, "bound_ms": 0.2, "reads_per_token": 0,
                    "belady_reads_per_token": None}] +
                  [{"config": c, "fraction": f, "ms_per_token": 30 * (1 - f) + i, "bound_ms": 25 * (1 - f),
                    "reads_per_token": 8 * (1 - f) + i, "belady_reads_per_token": 6 * (1 - f)}
                   for i, c in enumerate(("LRU", "EdgeMoE eviction")) for f in (0.1, 0.25, 0.5)],),
        "soak": ([{"build": "release", "rss_first": 40 << 20, "rss_last": 41 << 20},
                  {"build": "ASan+LSan+UBSan", "rss_first": None, "rss_last": None}],),
    }
    for name, args in charts.items():
        path = tmp_path / "charts" / f"{name}.png"
        assert getattr(plots, name)(path, *args, title=f"a {name} chart") == path
        assert_png(path)


# ------------------------------------------------------------------------------ bench, end to end

@pytest.fixture(scope="module")
def tiny_artifact(tiny_mixtral_dir, tmp_path_factory, runtime_lib):
    """The random test model: no calibration (no routing profile), no tokenizer, context 64."""
    from edgemoe.compiler.driver import CompileOptions, compile_model

    out = tmp_path_factory.mktemp("plots_int4")
    compile_model(tiny_mixtral_dir, out, CompileOptions(expert_bits=4, max_seq=64), log=lambda m: None)
    return out


PIPELINE = ["--tokens", "1,2,3", "-n", "3", "--max-seq", "32", "--emulate-storage", "2000,0"]


def test_bench_pipeline_writes_its_chart(tiny_artifact, tmp_path):
    path = tmp_path / "out" / "pipeline.png"
    r = CliRunner().invoke(bench_cmd, ["pipeline", str(tiny_artifact), *PIPELINE, "--plot", str(path)])
    assert_wrote(r, path)
    assert "| IO-FREE (all experts resident) |" in r.stdout  # the table is still there, on stdout


def test_bench_plot_default_name_and_opting_out(tiny_artifact, tmp_path, monkeypatch):
    """Without --plot the chart lands in the current folder as edgemoe-bench-<subcommand>.png;
    --no-plot and --plot '' write none."""
    monkeypatch.chdir(tmp_path)
    for opt_out in (["--no-plot"], ["--plot", ""]):
        r = CliRunner().invoke(bench_cmd, ["pipeline", str(tiny_artifact), *PIPELINE, *opt_out])
        assert r.exit_code == 0 and "wrote" not in r.stderr, (opt_out, r.output)
        assert list(tmp_path.iterdir()) == []
    r = CliRunner().invoke(bench_cmd, ["pipeline", str(tiny_artifact), *PIPELINE])
    assert_wrote(r, Path("edgemoe-bench-pipeline.png"))
    assert [p.name for p in tmp_path.iterdir()] == ["edgemoe-bench-pipeline.png"]


def test_bench_budget_writes_its_chart(tiny_artifact, tmp_path):
    path = tmp_path / "budget.png"
    r = CliRunner().invoke(bench_cmd, ["budget", str(tiny_artifact), str(tiny_artifact), "--budget", "8MiB",
                                       "--tokens", "1,2,3", "-n", "3", "--max-seq", "32", "--emulate-storage",
                                       "2000,0", "--plot", str(path)])
    assert_wrote(r, path)


def test_bench_soak_writes_its_chart(tiny_artifact, tmp_path):
    path = tmp_path / "soak.png"
    r = CliRunner().invoke(bench_cmd, ["soak", str(tiny_artifact), "--tokens", "40", "--round", "20",
                                       "--no-sanitizers", "--plot", str(path)])
    assert_wrote(r, path)


def test_bench_predictors_writes_its_chart(artifact_int4, tmp_path):
    from conftest import CALIBRATION

    path = tmp_path / "predictors.png"
    r = CliRunner().invoke(bench_cmd, ["predictors", str(artifact_int4), "--text", str(CALIBRATION), "--tokens", "64",
                                       "--window", "32", "--plot", str(path)])
    assert_wrote(r, path)
    # two layers ahead: a column for the farther guesses, filled for the hidden-state predictors only
    r = CliRunner().invoke(bench_cmd, ["predictors", str(artifact_int4), "--text", str(CALIBRATION), "--tokens", "64",
                                       "--window", "32", "--prefetch-layers", "2", "--no-plot"])
    assert r.exit_code == 0, r.output
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in r.output.splitlines()
            if line.startswith("| ") and "---" not in line}
    assert rows["predictor"][3] == "predicted two or more layers ahead"
    assert rows["fitted-router"][3].endswith("%") and rows["path-table"][3] == "–" and rows["none"][3] == "–"


def test_bench_sweep_writes_its_chart_and_no_policy_beats_belady(artifact_int4, tmp_path):
    import json

    path, out = tmp_path / "sweep.png", tmp_path / "sweep.json"
    r = CliRunner().invoke(bench_cmd, ["sweep", str(artifact_int4), "--tokens", "1,2,3", "-n", "12", "--fractions",
                                       "0.25,0.5", "--max-seq", "32", "--emulate-storage", "2000,0", "--plot",
                                       str(path), "--json-out", str(out), "--prefetch-layers", "2"])
    assert_wrote(r, path)
    assert "identical tokens in every run of an artifact: True" in r.stdout
    rows = json.loads(out.read_text())["rows"]
    cached = [row for row in rows if row["fraction"] not in (None, 0.0)]
    assert len(cached) == 8  # LRU, EdgeMoE eviction, EdgeMoE + prediction (1 and 2 layers ahead) at two budgets
    for row in cached:  # MIN is optimal among all policies, prefetching ones included, at equal slots
        assert row["belady_reads_per_token"] <= row["reads_per_token"] + 1e-9, row
        assert row["ms_per_token"] > 0 and row["bound_ms"] > 0
        # a request reads one record or a run of adjacent ones
        assert row["requests_per_token"] <= row["reads_per_token"] + 1e-9, row
