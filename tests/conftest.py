"""Shared pytest fixtures: fake and real MNIST, the tiny training overrides, the checkpoints that many tests read
(each trained once per test session), and the console commands run in this process.

Two tiers (README "Test"): ``python -m pytest -q`` runs everything; ``python -m pytest -q -m "not slow"`` skips the
tests marked ``slow`` (real subprocesses, DDP, signals, the built wheel, benchmarks, real MNIST, long fuzzing).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from mnist_fixtures import REAL_MNIST_ROOT, requires_real_mnist, write_fake_mnist  # noqa: F401

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
REPO = CONF_DIR.parent


def pytest_configure(config: pytest.Config) -> None:
    # One intra-op thread in the test process, as the subprocess tests run (OMP_NUM_THREADS=1): the tiny tensors of the
    # tests gain nothing from a second thread, and OpenMP threads that spin-wait for a busy core (pytest-xdist workers,
    # a DDP test's ranks) cost several times their work. Not in pytest-xdist's controller, which runs no test: its
    # import of torch (~4 s of CPU on 2 cores) would only delay the workers' start.
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        return
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def fake_mnist_root(tmp_path: Path) -> Path:
    """A root with tiny valid MNIST IDX files in ``MNIST/raw`` (64 train, 32 test images)."""
    return write_fake_mnist(tmp_path / "data")


@pytest.fixture(scope="session")
def session_mnist_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same 64 + 32 fake MNIST images as :func:`fake_mnist_root`, written once per session (read-only use)."""
    return write_fake_mnist(tmp_path_factory.mktemp("session_mnist"))


@pytest.fixture(scope="session")
def fake_root(session_mnist_root: Path) -> Path:
    """The session's fake MNIST (64 train, 32 test images) under the name the classifier and metric tests use."""
    return session_mnist_root


@pytest.fixture(scope="session")
def fake_clf(fake_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A classifier trained for 3 steps on the fake MNIST, once per session (only the plumbing is tested with it)."""
    from ddpm_lightning import classifier

    path = tmp_path_factory.mktemp("clf") / "clf.pt"
    result = classifier.train_classifier(fake_root, path, max_steps=3, batch_size=32, verbose=False)
    assert result["steps"] == 3 and result["path"] == path
    return path


@pytest.fixture(scope="session")
def real_mnist_root() -> Path:
    """Root of the real MNIST (``/work/shared/data``); skips the test when it is absent."""
    if not (REAL_MNIST_ROOT / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        pytest.skip(f"real MNIST not found under {REAL_MNIST_ROOT}/MNIST/raw")
    return REAL_MNIST_ROOT


#: Overrides that make a real composed training run take seconds: the tiny ADMUNet, tiny data, DDIM-4 pictures.
TINY_TRAIN = [
    "model=adm_tiny",
    "data.batch_size=8",
    "data.subset_size=16",
    "data.val_size=8",
    "trainer.max_epochs=1",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "callbacks.samples.num_samples=4",
    "callbacks.samples.trajectory_samples=2",
    "callbacks.samples.trajectory_frames=3",
    "callbacks.samples.sampler={_target_: ddpm_lightning.samplers.DDIMSampler, steps: 4}",
]

#: schedule.timesteps of the shared test checkpoints: full DDPM sampling stays cheap and T is not the default.
TINY_T = 50

#: The run behind :func:`tiny_run`: TINY_TRAIN with T = 50 and DDIM-3 as the run's (stored) sampler; 16 images in
#: batches of 8, one epoch = 2 optimizer steps. A resume from its checkpoint needs these overrides (same network and
#: schedule).
TINY_CKPT_TRAIN = [*TINY_TRAIN, f"schedule.timesteps={TINY_T}", "sampler=ddim", "sampler.steps=3"]


def compose_train(overrides: list[str]):
    """Compose the real ``conf/train.yaml`` with ``overrides`` as ``ddpm-train`` does (one-line errors for unknown
    keys), without running Hydra."""
    from ddpm_lightning.config import compose_config

    return compose_config("train", overrides)


@pytest.fixture
def tiny_train_overrides(fake_mnist_root: Path, tmp_path: Path) -> list[str]:
    """TINY_TRAIN on the fake MNIST, writing into ``tmp_path/run``."""
    return [*TINY_TRAIN, f"data.root={fake_mnist_root}", f"run_dir={tmp_path / 'run'}"]


def _train_once(tmp_path_factory: pytest.TempPathFactory, root: Path, name: str, overrides: list[str]) -> dict:
    from ddpm_lightning.training import train

    result = train(compose_train([*overrides, f"data.root={root}", f"run_dir={tmp_path_factory.mktemp(name)}"]))
    assert result["last_ckpt"].is_file()
    return result


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, session_mnist_root: Path) -> dict:
    """:data:`TINY_CKPT_TRAIN` trained once per session on :func:`session_mnist_root`: ``train()``'s result
    (``run_dir``, ``last_ckpt``, ``trainer`` ...). Tests read its files and never write into ``run_dir``."""
    return _train_once(tmp_path_factory, session_mnist_root, "tiny_run", TINY_CKPT_TRAIN)


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_run: dict) -> Path:
    """``last.ckpt`` of :func:`tiny_run` (unconditional, eps, T = 50, EMA on, 2 steps, the run's sampler DDIM-3)."""
    return tiny_run["last_ckpt"]


@pytest.fixture(scope="session")
def conditional_ckpt(tmp_path_factory: pytest.TempPathFactory, session_mnist_root: Path) -> Path:
    """A 1-epoch class-conditional tiny ADMUNet (``model.num_classes=10``), T = 50, trained once per session."""
    return _train_once(
        tmp_path_factory, session_mnist_root, "conditional_run", [*TINY_CKPT_TRAIN, "model.num_classes=10"]
    )["last_ckpt"]


# ------------------------------------------------------------------------------------------------ the commands
@dataclass
class CommandResult:
    """What a console command left behind: its exit status and everything it printed."""

    returncode: int
    stdout: str
    stderr: str


def _entry_point(command: str):
    from importlib import import_module

    module = {
        "ddpm-train": "train",
        "ddpm-sample": "sample",
        "ddpm-evaluate": "evaluate",
        "ddpm-train-classifier": "train_classifier",
        "ddpm-report": "report",
    }[command]
    return import_module(f"ddpm_lightning.cli.{module}").main


@pytest.fixture
def run_command(monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture) -> callable:
    """``run_command("ddpm-train", [args...], cwd=...)`` runs that console script's entry point in this process, as
    the installed script would (``sys.argv``, the working folder, Hydra, the one error boundary and its exit status),
    and returns a :class:`CommandResult`. Without the ~6 s of imports of a new interpreter; the tests that need one
    (signals, DDP, the built wheel, concurrent processes) still start real processes."""

    def run(command: str, args: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> CommandResult:
        capfd.readouterr()  # drop what came before
        root = logging.getLogger()
        handlers, level = root.handlers[:], root.level
        with monkeypatch.context() as patch:
            patch.setattr(sys, "argv", [command, *map(str, args)])
            patch.setenv("HYDRA_FULL_ERROR", "0")
            for key, value in (env or {}).items():
                patch.setenv(key, value)
            if cwd is not None:
                patch.chdir(cwd)
            try:
                status = _entry_point(command)()
                code = 0 if status is None or not isinstance(status, int) else status
            except SystemExit as exited:
                code = exited.code if isinstance(exited.code, int) else (0 if exited.code is None else 1)
            finally:
                # Hydra's job logging bound the root logger to this test's captured streams: give it its handlers back
                root.handlers[:] = handlers
                root.setLevel(level)
        out = capfd.readouterr()
        return CommandResult(code, out.out, out.err)

    return run


def invoke(command: str, args: list[str], cwd: Path) -> int:
    """A console command's entry point run in this process (as :func:`run_command`, without capturing its output, for
    session fixtures); returns its exit status."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", [command, *map(str, args)])
        patch.setenv("HYDRA_FULL_ERROR", "0")
        patch.chdir(cwd)
        try:
            _entry_point(command)()
            return 0
        except SystemExit as exited:
            return exited.code if isinstance(exited.code, int) else (0 if exited.code is None else 1)
        finally:
            root.handlers[:] = handlers
            root.setLevel(level)


#: The tiny sweep of :func:`tiny_sweep`: three values of beta_end, 8 images (one step per job), DDIM-2 pictures, and a
#: 4-sample end-of-run evaluation with the packaged reference classifier.
TINY_SWEEP_BETAS = [0.02, 0.1, 0.2]


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory: pytest.TempPathFactory, session_mnist_root: Path) -> Path:
    """``ddpm-train -m schedule.beta_end=0.02,0.1,0.2 ...`` (Hydra's basic launcher, in this process) run once per
    session: the sweep folder with jobs 0, 1, 2. Read only (test_train.py and test_report.py look at it)."""
    base = tmp_path_factory.mktemp("tiny_sweep")
    sweep = base / "sweep"
    status = invoke(
        "ddpm-train",
        [
            "-m",
            "schedule.beta_end=" + ",".join(map(str, TINY_SWEEP_BETAS)),
            *[o for o in TINY_TRAIN if not o.startswith("callbacks.samples.sampler")],
            "callbacks.samples.sampler={_target_: ddpm_lightning.samplers.DDIMSampler, steps: 2}",
            "data.subset_size=8",
            f"data.root={session_mnist_root}",
            f"hydra.sweep.dir={sweep}",
            "evaluate={num_samples: 4, batch_size: 4, sampler: {steps: 2}}",  # the packaged reference classifier
        ],
        cwd=base,
    )
    assert status == 0
    return sweep


def run_train_cli(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m ddpm_lightning.cli.train *args`` in a new process in ``cwd`` (as a user types ``ddpm-train``),
    output captured. For what only a real process shows (signals, DDP, exit of the interpreter); else use
    :func:`run_command`."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "ddpm_lightning.cli.train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def run_script(monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture) -> callable:
    """``run_script(path, [args...])`` runs a script (``benchmarks/*.py``) as ``__main__`` in this process, with
    ``sys.argv`` and ``sys.path`` as ``python <path> <args>`` sets them, and returns a :class:`CommandResult`
    (argparse's exit status included)."""
    import runpy

    def run(path: Path, args: list[str], env: dict[str, str] | None = None) -> CommandResult:
        capfd.readouterr()
        with monkeypatch.context() as patch:
            patch.setattr(sys, "argv", [str(path), *map(str, args)])
            patch.setattr(sys, "path", [str(Path(path).parent), *sys.path])  # as `python <path>` starts
            for key, value in (env or {}).items():
                patch.setenv(key, value)
            try:
                runpy.run_path(str(path), run_name="__main__")
                code = 0
            except SystemExit as exited:
                code = exited.code if isinstance(exited.code, int) else (0 if exited.code is None else 1)
        out = capfd.readouterr()
        return CommandResult(code, out.out, out.err)

    return run
