"""Benchmarks are not timed tests: CI only proves that each one runs (``--quick --smoke``)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_sampling_speed_smoke(tmp_path):
    out = tmp_path / "speed.json"
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "sampling_speed.py"), "--quick", "--smoke", "--num-samples", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert {"step_time", "cross_check", "batch_sweep", "notes", "diffusers"} <= set(result)
    rows = {r["variant"]: r for r in result["step_time"]}
    assert {"forward", "ours DDIM", "ours DDPM"} <= set(rows)
    assert {rows[k]["full_run"] for k in ("ours DDIM", "ours DDPM")} == {"DDIM-2", "DDPM-1000"}
    assert all(r["ms_per_step"] > 0 for r in rows.values())
    assert all(rows[k]["images_per_s"] > 0 and rows[k]["overhead_pct"] is not None for k in ("ours DDIM", "ours DDPM"))
    assert all(r["images_per_s"] > 0 for r in result["batch_sweep"])
    if result["diffusers"] is None:
        assert "diffusers not installed: skipped" in proc.stdout
    else:  # same noise (and generator): ours and diffusers agree up to float32 rounding
        assert rows["ours DDIM"]["ratio_ours_over_diffusers"] > 0
        matched = [r for r in result["cross_check"] if "default" not in r["setting"]]
        assert len(matched) == 2 and all(r["max_abs_diff"] < 1e-3 for r in matched)


def test_precision_smoke(tmp_path):
    out = tmp_path / "precision.json"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "precision.py"), "--quick", "--smoke", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"fp32", "bf16", "channels_last"}  # torch.compile only with --compile
    for r in rows.values():
        assert r["train_images_per_s"] > 0 and r["sample_images_per_s"] > 0
        assert {"train_speedup", "sample_speedup", "loss_rel_diff", "grad_rel_l2", "sample_rel_l2"} <= set(r)
    assert rows["fp32"]["train_speedup"] == 1 and rows["fp32"]["sample_rel_l2"] == 0
    assert rows["bf16"]["sample_rel_l2"] < 0.5 and rows["channels_last"]["sample_rel_l2"] < 1e-3


def test_gpu_check_smoke(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_check.py"), "--smoke", "--batch-size", "2",
                           "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["train_images_per_s"] > 0 and result["ddim50_images_per_s"] > 0
    assert result["projected_100_epochs_60k_hours"] > 0


@pytest.mark.slow
def test_gpu_check_sh_dry_run_runs_every_phase_on_a_cpu(tmp_path):
    """benchmarks/gpu_check.sh --dry-run: the GPU check's own phases, in their own processes and time limits, with a
    tiny network on a CPU and synthetic MNIST; every phase ends ok, and the JSON and markdown summary are written."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_BUDGET_S": "1500", "GPU_CHECK_LIMIT_SCALE": "4",
           "DATA_ROOT": str(tmp_path / "none"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(BENCHMARKS / "gpu_check.sh"), "--dry-run", str(out)], capture_output=True,
                          text=True, timeout=1800, env=env, cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert {p.name for p in out.iterdir()} == {"phases.jsonl", "gpu_check.json", "gpu_check.md", "gpu_check.log"}
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["summary"]["phases"] == {name: "ok" for name in ("versions", "steps", "census", "sampling",
                                                                   "variants", "train")}, result["summary"]["phases"]
    phases = result["phases"]
    assert phases["steps"]["rows"][0]["ratio"] > 0 and phases["census"]["test_syncs"]["returncode"] == 0
    assert phases["census"]["real_step"]["syncs"]["steady_step_syncs_max"] == 0
    assert {r["sampler"] for r in phases["sampling"]["rows"]} == {"DDIM-50", "SDE-DPM-Solver++-20", "DDPM-1000"}
    assert phases["train"]["fid"] is not None and result["summary"]["plan_100_epochs"]
    text = (out / "gpu_check.md").read_text()
    assert "## Training step" in text and "## Sampling" in text and "project / bare" in text


def _smoke(tmp_path, script: str, *extra: str):
    out = tmp_path / f"{script}.json"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), "--quick", "--smoke", *extra, "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def _assert_machine(info: dict) -> None:
    assert info["cpu_model"] and info["torch_threads"] >= 1 and isinstance(info["cpu_flags"], list)
    assert info["gemm_fp32_gflops"] > 0 and info["gemm_bf16_gflops"] > 0


def test_train_overhead_smoke(tmp_path):
    result = _smoke(tmp_path, "train_overhead.py", "--batch-size", "8")
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
    assert [p.name for p in tmp_path.glob("*.json")] == ["train_overhead.py.json"]  # only the --json file


def test_benchmark_outputs_default_to_results():
    """Run without --json, every benchmark writes under benchmarks/results/, never into the current folder."""
    for script in ("train_overhead.py", "data_pipeline.py", "sampling_speed.py", "precision.py", "memory.py", "gpu_check.py"):
        # argparse wraps help at $COLUMNS, inside a long path too (CI's clone at /check/... broke "benchma\nrks")
        proc = subprocess.run([sys.executable, str(BENCHMARKS / script), "--help"], capture_output=True, text=True,
                              timeout=120, env={**os.environ, "COLUMNS": "10000"})
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert f"(default: {BENCHMARKS / 'results'}/" in proc.stdout, script


def test_train_overhead_refuses_too_few_rounds(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "train_overhead.py"), "--rounds", "3"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and "--rounds=3: must be >= 5" in proc.stderr


def test_data_pipeline_smoke(tmp_path):
    result = _smoke(tmp_path, "data_pipeline.py")
    _assert_machine(result["machine"])
    assert {r["path"] for r in result["rows"]} == {"project", "project per-item", "torchvision PIL"}
    assert result["max_abs_diff_vs_torchvision"] == 0.0  # same pixels as torchvision's Pad + ToTensor + Normalize


def test_memory_smoke(tmp_path):
    result = _smoke(tmp_path, "memory.py")
    _assert_machine(result["machine"])
    rows = result["rows"]
    assert [r["case"] for r in rows] == ["baseline", "train adm_tiny", "sample adm_tiny"]
    assert all(r["peak_rss_gib"] > 0.05 for r in rows)


def test_run_all_smoke(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "run_all.py"), "--quick", "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p.name for p in tmp_path.glob("*.json")} >= {"train_overhead.json", "data_pipeline.json",
                                                          "sampling_speed.json", "precision.json", "memory.json"}
