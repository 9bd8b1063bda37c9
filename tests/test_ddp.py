"""DDP on CPU (2 gloo processes) and the refusal of DDP inside a local Hydra multirun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_TRAIN

from ddpm_lightning.data import EpochShuffleSampler
from ddpm_lightning.module import derive_seed


def _cli(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "ddpm_lightning.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_ranks_draw_different_but_reproducible_noise():
    seeds = {derive_seed(0, "train", 7, rank) for rank in range(4)}
    assert len(seeds) == 4
    assert derive_seed(0, "train", 7, 1) == derive_seed(0, "train", 7, 1)


def test_shuffle_sampler_is_replaced_by_a_distributed_sampler_under_ddp():
    """A RandomSampler subclass: Lightning swaps in DistributedSampler(shuffle=True), also a function of seed+epoch."""
    from torch.utils.data import DataLoader, RandomSampler

    from lightning.pytorch.utilities.data import _is_dataloader_shuffled

    sampler = EpochShuffleSampler(10, seed=3)
    assert isinstance(sampler, RandomSampler)
    assert _is_dataloader_shuffled(DataLoader(range(10), sampler=sampler))
    sampler.set_epoch(1)
    first = list(sampler)
    sampler.set_epoch(2)
    assert sorted(first) == list(range(10)) and list(sampler) != first


def test_local_multirun_with_ddp_is_refused_before_any_work(fake_mnist_root, tmp_path):
    proc = _cli(["-m", "trainer=ddp_sim", "schedule.beta_end=0.02,0.2", *TINY_TRAIN, f"data.root={fake_mnist_root}",
                 f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=tmp_path, timeout=180)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: trainer.strategy='ddp' is invalid") and "hydra/launcher=slurm" in last
    assert not list((tmp_path / "sweep").glob("*/checkpoints"))


@pytest.mark.slow
def test_two_process_cpu_ddp_trains_into_one_run_directory(fake_mnist_root, tmp_path):
    run = tmp_path / "run"
    proc = _cli(["trainer=ddp_sim", *TINY_TRAIN, "trainer.max_epochs=2", f"data.root={fake_mnist_root}",
                 f"run_dir={run}", f"hydra.run.dir={tmp_path / 'hydra'}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    # 16 images, batch 8, 2 ranks: 1 step per epoch on each rank
    assert ckpt["global_step"] == 2 and ckpt["epoch"] == 1
    assert len(list((run / "samples").glob("epoch_*.png"))) == 2  # rank zero only, once per epoch
    # rank zero alone writes TensorBoard: its training events and, after fit, the final hp/* metrics (same pid)
    assert len({f.name.split(".")[-2] for f in (run / "tensorboard").glob("events.out.tfevents.*")}) == 1
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


@pytest.mark.slow
def test_killed_run_resumes_with_the_same_command_and_matches_an_uninterrupted_run(fake_mnist_root, tmp_path):
    """SIGKILL a CPU training run after its first checkpoint (mid-training); the same command with ckpt_path=last
    resumes from last.ckpt and ends at the same step with the same weights as a run that was never killed."""
    import signal
    import time

    common = [*TINY_TRAIN, "data.subset_size=64", "trainer.max_epochs=12", "callbacks.samples.every_n_epochs=0",
              f"data.root={fake_mnist_root}", "ckpt_path=last"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "ddpm_lightning.train", *common, f"run_dir={run}", f"hydra.run.dir={tmp_path / 'h1'}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    assert 0 < killed_at < 96  # 8 steps per epoch, 12 epochs

    again = subprocess.run([*cmd[:-1], f"hydra.run.dir={tmp_path / 'h2'}"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Restored all states from the checkpoint" in again.stderr + again.stdout
    straight = _cli([*common, f"run_dir={tmp_path / 'straight'}", f"hydra.run.dir={tmp_path / 'h3'}"], cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    a = torch.load(last, map_location="cpu", weights_only=True)
    b = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert a["global_step"] == b["global_step"] == 96
    for key in ["state_dict", "current_model_state"]:
        for name, value in b[key].items():
            assert torch.equal(a[key][name], value), f"{key}: {name}"


def test_slurm_launcher_config_composes_for_a_beta_sweep():
    """hydra/launcher=slurm (the [slurm] extra): one task per GPU, requeue on preemption, cluster keys left to the user."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir

    from conftest import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                                          "hydra.launcher.gpus_per_node=4", "trainer=ddp"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node) == ("gpu", 4, 4)
    assert launcher.max_num_timeout == 3 and launcher.account is None
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.devices == -1
