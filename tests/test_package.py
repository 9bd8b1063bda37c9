"""The package as a user installs it: a built wheel (not the editable checkout) holds the configs and the reference
classifier, and its console scripts work from a folder outside the repository with an empty HOME."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import CONF_DIR, TINY_TRAIN

REPO = CONF_DIR.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out, src = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("src") / "ddpm-lightning"
    # from a copy: an in-tree build would leave build/ in the checkout, and a stale build/lib could leak into wheels
    shutil.copytree(
        REPO,
        src,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "outputs", "build", "*.egg-info", ".pytest_cache", ".hypothesis", "__pycache__"
        ),
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return next(out.glob("ddpm_lightning-*.whl"))


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """The wheel installed (without its dependencies, which this venv has) into a folder of its own."""
    site = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return site


def _run_installed(site: Path, script: str, args: list[str], cwd: Path, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site), "HOME": str(home), "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    env.pop("DDPM_LIGHTNING_CACHE", None)
    return subprocess.run(
        [sys.executable, str(site / "bin" / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_the_wheel_holds_every_config_and_the_reference_classifier(wheel):
    from ddpm_lightning.classifier import REFERENCE_CLASSIFIER_SHA256

    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {f"ddpm_lightning/conf/{p.relative_to(CONF_DIR).as_posix()}" for p in CONF_DIR.rglob("*.yaml")}
    assert len(configs) > 20 and configs <= names, sorted(configs - names)
    assert "ddpm_lightning/assets/mnist_classifier.pt" in names
    assert not any(n.startswith(("conf/", "tests/")) for n in names)  # nothing at the top of site-packages
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    for script in ("ddpm-train", "ddpm-sample", "ddpm-evaluate", "ddpm-train-classifier", "ddpm-report"):
        assert f"{script} = " in entry_points
    assert len(REFERENCE_CLASSIFIER_SHA256) == 64


@pytest.mark.slow
def test_the_installed_wheel_trains_and_evaluates_outside_the_repo(installed, fake_mnist_root, tmp_path):
    elsewhere, home = tmp_path / "elsewhere", tmp_path / "home"
    elsewhere.mkdir()
    home.mkdir()
    where = subprocess.run(
        [sys.executable, "-c", "import ddpm_lightning.config as c; print(c.__file__, c.CONFIG_DIR)"],
        cwd=elsewhere,
        env={**os.environ, "PYTHONPATH": str(installed)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    module_file, config_dir = where.stdout.split()
    assert module_file.startswith(str(installed)) and config_dir == str(installed / "ddpm_lightning" / "conf")

    run = elsewhere / "run"
    train = _run_installed(
        installed,
        "ddpm-train",
        [
            *TINY_TRAIN,
            f"data.root={fake_mnist_root}",
            f"run_dir={run}",
            "evaluate={num_samples: 4, batch_size: 4, sampler: {steps: 2}}",
        ],
        elsewhere,
        home,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    assert (run / "checkpoints" / "last.ckpt").is_file()
    out = train.stdout + train.stderr  # each line once; no advertisement; no warning only a dependency can act on
    assert out.count("[samples] epoch 0: drawing") == 1 and "litlogger" not in out and "LeafSpec" not in out, out[
        -3000:
    ]
    metrics = json.loads(next((run / "evaluate").glob("step_*/metrics.json")).read_text())
    assert metrics["classifier_reference"] is True and metrics["n"] == 4
    sample = _run_installed(
        installed,
        "ddpm-sample",
        [f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "num_samples=2", f"out_dir={elsewhere / 's'}"],
        elsewhere,
        home,
    )
    assert sample.returncode == 0, sample.stderr[-3000:]
    assert "the checkpoint's sampler" in sample.stdout and (elsewhere / "s" / "samples.npz").is_file()
    # the other three console scripts start from the wheel too (their bodies run in-process in the other tests)
    for script, usage in [
        ("ddpm-evaluate", "evaluate is powered by Hydra"),
        ("ddpm-train-classifier", "train_classifier is powered by Hydra"),
        ("ddpm-report", "usage: ddpm-report"),
    ]:
        helped = _run_installed(installed, script, ["--help"], elsewhere, home)
        assert helped.returncode == 0 and usage in helped.stdout, (script, helped.stderr[-2000:])
    assert not any(home.rglob("*.pt"))  # nothing was needed in, or written to, the user's cache
