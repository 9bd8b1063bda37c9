"""Benchmarks are not timed tests: CI only proves that each one runs (``--quick --smoke``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_sampling_speed_smoke(tmp_path):
    out = tmp_path / "speed.json"
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "sampling_speed.py"), "--quick", "--smoke", "--num-samples", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert {r["sampler"] for r in rows} == {"DDIM-2", "DDPM-1000"}
    assert all(r["images_per_s"] > 0 for r in rows)


def test_gpu_check_smoke(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_check.py"), "--smoke", "--batch-size", "2",
                           "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["train_images_per_s"] > 0 and result["ddim50_images_per_s"] > 0
    assert result["projected_100_epochs_60k_hours"] > 0
