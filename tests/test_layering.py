"""The layering the README promises: the maths and the image / data / classifier modules import neither Lightning
nor Hydra (nor OmegaConf), so they are usable and testable on their own. Checked in a fresh interpreter, where
nothing else has imported them yet."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: README "Layout": the modules that import neither Lightning nor Hydra.
PURE = ["schedule", "objectives", "samplers", "losses", "timestep_sampling", "metrics", "mnist", "images", "classifier"]
FORBIDDEN = {"hydra", "lightning", "lightning_fabric", "pytorch_lightning", "omegaconf"}


@pytest.mark.slow  # a second interpreter (its own imports: ~7 s on the slower 2-core kind)
def test_the_maths_images_data_and_classifier_modules_import_neither_lightning_nor_hydra():
    code = (
        f"import sys; import {', '.join(f'ddpm_lightning.{m}' for m in PURE)}; "
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({sorted(FORBIDDEN)!r})))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr[-2000:]
