"""Benchmarks are not timed tests: CI only proves that each one runs (``--quick --smoke``). ``run_all.py --smoke`` runs
them all once, one after the other, in its own process (without ``--smoke`` each script gets a process of its own);
the tests read its JSON files."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SMOKE_JSON = ["train_overhead.json", "data_pipeline.json", "sampling_speed.json", "precision.json", "memory.json"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    """``python benchmarks/run_all.py --quick --smoke --out <dir>`` run once, from an empty working folder:
    ``{"out": <dir>, "cwd": <folder>, "stdout": ..., "<name>.json": <its JSON>}``."""
    out, cwd = tmp_path_factory.mktemp("bench_out"), tmp_path_factory.mktemp("bench_cwd")
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "run_all.py"), "--quick", "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=cwd,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {
        "out": out,
        "cwd": cwd,
        "stdout": proc.stdout,
        **{p.name: json.loads(p.read_text()) for p in out.glob("*.json")},
    }


@pytest.mark.slow
def test_run_all_smoke_writes_one_json_per_benchmark_and_nothing_else(smoke):
    assert sorted(p.name for p in smoke["out"].iterdir()) == sorted(SMOKE_JSON)
    assert not list(smoke["cwd"].iterdir())  # nothing in the folder it was started from


@pytest.mark.slow
def test_sampling_speed_smoke(smoke):
    result = smoke["sampling_speed.json"]
    assert {"step_time", "cross_check", "batch_sweep", "notes", "diffusers"} <= set(result)
    rows = {r["variant"]: r for r in result["step_time"]}
    assert {"forward", "ours DDIM", "ours DDPM"} <= set(rows)
    assert {rows[k]["full_run"] for k in ("ours DDIM", "ours DDPM")} == {"DDIM-2", "DDPM-1000"}
    assert all(r["ms_per_step"] > 0 for r in rows.values())
    assert all(rows[k]["images_per_s"] > 0 and rows[k]["overhead_pct"] is not None for k in ("ours DDIM", "ours DDPM"))
    assert all(r["images_per_s"] > 0 for r in result["batch_sweep"])
    if result["diffusers"] is None:
        assert "diffusers not installed: skipped" in smoke["stdout"]
    else:  # same noise (and generator): ours and diffusers agree up to float32 rounding
        assert rows["ours DDIM"]["ratio_ours_over_diffusers"] > 0
        matched = [r for r in result["cross_check"] if "default" not in r["setting"]]
        assert len(matched) == 2 and all(r["max_abs_diff"] < 1e-3 for r in matched)


@pytest.mark.slow
def test_precision_smoke(smoke):
    result = smoke["precision.json"]
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"fp32", "bf16", "channels_last"}  # torch.compile only with --compile
    for r in rows.values():
        assert r["train_images_per_s"] > 0 and r["sample_images_per_s"] > 0
        assert {"train_speedup", "sample_speedup", "loss_rel_diff", "grad_rel_l2", "sample_rel_l2"} <= set(r)
    assert rows["fp32"]["train_speedup"] == 1 and rows["fp32"]["sample_rel_l2"] == 0
    assert rows["bf16"]["sample_rel_l2"] < 0.5 and rows["channels_last"]["sample_rel_l2"] < 1e-3


@pytest.mark.slow
def test_gpu_check_sh_dry_run_runs_every_phase_on_a_cpu(tmp_path):
    """benchmarks/gpu_check.sh --dry-run: the GPU check's own phases, in their own processes and time limits, with a
    tiny network on a CPU and synthetic MNIST; every phase ends ok, and the JSON and markdown summary are written."""
    out = tmp_path / "out"
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "GPU_CHECK_BUDGET_S": "1500",
        "GPU_CHECK_LIMIT_SCALE": "4",
        "DATA_ROOT": str(tmp_path / "none"),
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu_check.sh"), "--dry-run", str(out)],
        capture_output=True,
        text=True,
        timeout=1800,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert {p.name for p in out.iterdir()} == {"phases.jsonl", "gpu_check.json", "gpu_check.md", "gpu_check.log"}
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["summary"]["phases"] == {
        name: "ok" for name in ("versions", "steps", "census", "sampling", "variants", "train")
    }, result["summary"]["phases"]
    phases = result["phases"]
    assert phases["steps"]["rows"][0]["ratio"] > 0 and phases["census"]["test_syncs"]["returncode"] == 0
    assert phases["census"]["real_step"]["syncs"]["steady_step_syncs_max"] == 0
    assert {r["sampler"] for r in phases["sampling"]["rows"]} == {"DDIM-50", "SDE-DPM-Solver++-20", "DDPM-1000"}
    assert phases["train"]["fid"] is not None and result["summary"]["plan_100_epochs"]
    text = (out / "gpu_check.md").read_text()
    assert "## Training step" in text and "## Sampling" in text and "project / bare" in text


def _assert_machine(info: dict) -> None:
    assert info["cpu_model"] and info["torch_threads"] >= 1 and isinstance(info["cpu_flags"], list)
    assert info["gemm_fp32_gflops"] > 0 and info["gemm_bf16_gflops"] > 0


@pytest.mark.slow
def test_train_overhead_smoke(smoke):
    result = smoke["train_overhead.json"]  # run_all passes --batch-size 8 with --smoke
    _assert_machine(result["machine"])
    rows = result["rows"]
    assert [r["network"] for r in rows] == ["adm_tiny"]
    row = rows[0]
    assert row["bare_images_per_s"] > 0 and row["project_images_per_s"] > 0 and row["ratio"] > 0
    # ABAB rounds, one thread count for both arms, the median of the rounds reported
    assert row["rounds"] == 2 == len(row["bare_runs"]) == len(row["project_runs"])
    assert row["bare_images_per_s"] == statistics.median(row["bare_runs"])
    assert row["project_images_per_s"] == statistics.median(row["project_runs"])
    assert row["gflop_per_image"] > 0 and row["project_gflops"] == row["project_images_per_s"] * row["gflop_per_image"]
    # only the --json file: test_run_all_smoke_writes_one_json_per_benchmark_and_nothing_else


@pytest.mark.parametrize(
    "script",
    ["train_overhead.py", "data_pipeline.py", "sampling_speed.py", "precision.py", "memory.py", "gpu_check.py"],
)
def test_benchmark_outputs_default_to_results(script, run_script):
    """Run without --json, every benchmark writes under benchmarks/results/, never into the current folder."""
    # argparse wraps help at $COLUMNS, inside a long path too (CI's clone at /check/... broke "benchma\nrks")
    proc = run_script(BENCHMARKS / script, ["--help"], env={"COLUMNS": "10000"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"(default: {BENCHMARKS / 'results'}/" in proc.stdout, script


def test_train_overhead_refuses_too_few_rounds(tmp_path, run_script, monkeypatch):
    monkeypatch.chdir(tmp_path)
    proc = run_script(BENCHMARKS / "train_overhead.py", ["--rounds", "3"])
    assert proc.returncode == 2 and "--rounds=3: must be >= 5" in proc.stderr


@pytest.mark.slow
def test_data_pipeline_smoke(smoke):
    result = smoke["data_pipeline.json"]
    _assert_machine(result["machine"])
    assert {r["path"] for r in result["rows"]} == {"project", "project per-item", "torchvision PIL"}
    assert result["max_abs_diff_vs_torchvision"] == 0.0  # same pixels as torchvision's Pad + ToTensor + Normalize


@pytest.mark.slow
def test_memory_smoke(smoke):
    result = smoke["memory.json"]
    _assert_machine(result["machine"])
    rows = result["rows"]
    assert [r["case"] for r in rows] == ["baseline", "train adm_tiny", "sample adm_tiny"]
    assert all(r["peak_rss_gib"] > 0.05 for r in rows)


@pytest.mark.slow
def test_cpu_parallel_smoke(tmp_path):
    """benchmarks/cpu_parallel.py: the one-process and the two-process DDP arms, their ratio and the table."""
    out = tmp_path / "cpu_parallel.json"
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "cpu_parallel.py"), "--quick", "--smoke", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {r["arm"]: r for r in result["rows"]}
    assert list(rows) == ["1x2", "2x1 ddp"] and rows["1x2"]["ratio_to_first"] == 1.0
    assert all(len(r["runs"]) == 1 and r["images_per_s"] == statistics.median(r["runs"]) > 0 for r in rows.values())
    assert rows["2x1 ddp"]["processes"] == 2 and rows["2x1 ddp"]["ddp"] is True
    assert result["machine"]["cpu_model"] and "| 2x1 ddp | 2 x 1 | 32 |" in proc.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["cpu_parallel.json"]
