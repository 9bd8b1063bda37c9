"""DDP on CPU (2 gloo processes) and the refusal of DDP inside a local Hydra multirun."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddpm_lightning.data import EpochShuffleSampler
from ddpm_lightning.module import derive_seed

from conftest import TINY_TRAIN


def _cli(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "ddpm_lightning.cli.train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_ranks_draw_different_but_reproducible_noise():
    seeds = {derive_seed(0, "train", 7, rank) for rank in range(4)}
    assert len(seeds) == 4
    assert derive_seed(0, "train", 7, 1) == derive_seed(0, "train", 7, 1)


def test_shuffle_sampler_is_replaced_by_a_distributed_sampler_under_ddp():
    """A RandomSampler subclass: Lightning swaps in DistributedSampler(shuffle=True), also a function of seed+epoch."""
    from lightning.pytorch.utilities.data import _is_dataloader_shuffled
    from torch.utils.data import DataLoader, RandomSampler

    sampler = EpochShuffleSampler(10, seed=3)
    assert isinstance(sampler, RandomSampler)
    assert _is_dataloader_shuffled(DataLoader(range(10), sampler=sampler))
    sampler.set_epoch(1)
    first = list(sampler)
    sampler.set_epoch(2)
    assert sorted(first) == list(range(10)) and list(sampler) != first


def test_local_multirun_with_ddp_is_refused_before_any_work(fake_mnist_root, tmp_path, run_command):
    proc = run_command(
        "ddpm-train",
        [
            "-m",
            "trainer=ddp_sim",
            "schedule.beta_end=0.02,0.2",
            *TINY_TRAIN,
            f"data.root={fake_mnist_root}",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: trainer.strategy='ddp' is invalid") and "hydra/launcher=slurm" in last
    assert not list((tmp_path / "sweep").glob("*/checkpoints"))


@pytest.mark.slow
def test_two_process_cpu_ddp_trains_into_one_run_directory_and_the_ranks_share_one_importance_history(
    fake_mnist_root, tmp_path
):
    """One 2-rank run shows both: rank zero alone writes the run directory, and with the importance sampler
    (loss-second-moment) the saved history holds every rank's losses (2 ranks x batch 8 x 2 steps = 32; each rank
    alone saw 16)."""
    run = tmp_path / "run"
    proc = _cli(
        [
            "trainer=ddp_sim",
            *TINY_TRAIN,
            "trainer.max_epochs=2",
            f"data.root={fake_mnist_root}",
            f"run_dir={run}",
            f"hydra.run.dir={tmp_path / 'hydra'}",
            "diffusion.timestep_sampler=loss-second-moment",
            "schedule.timesteps=200",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    # 16 images, batch 8, 2 ranks: 1 step per epoch on each rank
    assert ckpt["global_step"] == 2 and ckpt["epoch"] == 1
    assert len(list((run / "samples").glob("epoch_*.png"))) == 2  # rank zero only, once per epoch
    # rank zero alone writes TensorBoard: its training events and, after fit, the final hp/* metrics (same pid)
    assert len({f.name.split(".")[-2] for f in (run / "tensorboard").glob("events.out.tfevents.*")}) == 1
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert int(ckpt["timestep_sampler"]["counts"].sum()) == 32


def _start(args: list[str], cwd: Path) -> tuple[subprocess.Popen, list[str]]:
    """A ddpm-train process (one thread) whose output lines are collected as they come."""
    import threading

    proc = subprocess.Popen(
        [sys.executable, "-m", "ddpm_lightning.cli.train", *args],
        cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    return proc, lines


def _kill_when(proc: subprocess.Popen, lines: list[str], ready) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` holds (polled every 10 ms); the test fails if the run ends first."""
    import time

    deadline = time.monotonic() + 300
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed:\n" + "".join(lines)[-3000:]


@pytest.mark.slow
def test_a_run_killed_in_training_in_the_grid_or_in_the_evaluation_resumes_to_the_same_weights_and_metrics(
    fake_mnist_root, tmp_path, run_command
):
    """SIGKILL a CPU training run at three points: mid-training (right after its first checkpoint, in epoch 1's
    steps), while it draws the last epoch's grid (before that epoch's checkpoint), and during the end-of-run
    evaluation. The same command with ckpt_path=last then ends, every time, at the same step with the same raw and
    EMA weights and the complete metrics.json of a run that was never killed (one uninterrupted run is the reference
    for all three). The killed runs are real processes; the uninterrupted and the resumed ones run the same command
    in this process, with the same one thread (bit-identical results need the same thread count)."""

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _killed_and_resumed(fake_mnist_root, tmp_path, run_command)
    finally:
        torch.set_num_threads(threads)


def _killed_and_resumed(fake_mnist_root: Path, tmp_path: Path, run_command) -> None:
    import json

    common = [
        *[o for o in TINY_TRAIN if not o.startswith("callbacks.samples.sampler")],
        "+model.patch_size=2",
        "data.subset_size=64",
        "trainer.max_epochs=2",
        "sampler.steps=100",
        "callbacks.samples.sampler=null",
        f"data.root={fake_mnist_root}",
        "ckpt_path=last",
        "evaluate={num_samples: 8, batch_size: 4, sampler: {steps: 50}}",
    ]
    straight = run_command(
        "ddpm-train", [*common, f"run_dir={tmp_path / 'straight'}", f"hydra.run.dir={tmp_path / 'h0'}"], cwd=tmp_path
    )
    assert straight.returncode == 0, straight.stderr[-3000:]
    reference = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert reference["global_step"] == 16  # 64 images / batch 8 = 8 steps per epoch, 2 epochs
    metrics = json.loads(next((tmp_path / "straight" / "evaluate").glob("step_*/metrics.json")).read_text())
    for phase in ("training", "grid", "evaluation"):
        run = tmp_path / phase
        proc, lines = _start([*common, f"run_dir={run}", f"hydra.run.dir={tmp_path / ('h1_' + phase)}"], tmp_path)
        ready = {
            "training": lambda run=run: (run / "checkpoints" / "last.ckpt").is_file(),
            "grid": lambda lines=lines: any("[samples] epoch 1: drawing" in line for line in lines),
            "evaluation": lambda lines=lines: any(line.startswith("evaluating ") for line in lines),
        }[phase]
        _kill_when(proc, lines, ready)
        killed_at = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]
        assert killed_at == (16 if phase == "evaluation" else 8), phase  # the newest complete checkpoint
        assert not list(run.glob("evaluate/step_*/metrics.json"))
        again = run_command(
            "ddpm-train", [*common, f"run_dir={run}", f"hydra.run.dir={tmp_path / ('h2_' + phase)}"], cwd=tmp_path
        )
        assert again.returncode == 0, again.stderr[-3000:]
        if phase != "evaluation":
            assert "Restored all states from the checkpoint" in again.stderr + again.stdout
        state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert state["global_step"] == reference["global_step"]
        for key in ["state_dict", "current_model_state"]:
            for name, value in reference[key].items():
                assert torch.equal(state[key][name], value), f"{phase} {key}: {name}"
        resumed = json.loads(next((run / "evaluate").glob("step_*/metrics.json")).read_text())
        assert resumed["n"] == 8 and resumed["fid"] == metrics["fid"], phase
        assert resumed["class_histogram"] == metrics["class_histogram"]


def test_slurm_launcher_config_composes_for_a_beta_sweep():
    """hydra/launcher=slurm (the [slurm] extra): one task per GPU, requeue on preemption, cluster keys left to the
    user."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir

    from conftest import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "hydra/launcher=slurm",
                "hydra.launcher.partition=gpu",
                "hydra.launcher.gpus_per_node=4",
                "trainer=ddp",
            ],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node) == ("gpu", 4, 4)
    assert launcher.max_num_timeout == 3 and launcher.account is None
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.devices == -1


def _sigterm_rank_zero(
    fake_mnist_root: Path, tmp_path: Path, phase: str
) -> tuple[subprocess.Popen, list[str], float, list[int]]:
    """Start a 2-process CPU DDP run, SIGTERM rank zero (the launching process) while it draws the epoch-end grid
    (``phase="grid"``: 16 samples with all 1000 DDPM steps, minutes of CPU) or while it trains (after its first
    checkpoint), and return the process, its output lines, the seconds until every rank had gone, and the ranks'
    pids."""
    import threading
    import time

    run = tmp_path / "run"
    args = [
        "trainer=ddp_sim",
        *[o for o in TINY_TRAIN if not o.startswith("callbacks.samples")],
        "trainer.max_epochs=50",
        "callbacks.samples.num_samples=16",
        "callbacks.samples.trajectory_samples=2",
        f"data.root={fake_mnist_root}",
        f"run_dir={run}",
        f"hydra.run.dir={tmp_path / 'hydra'}",
        "callbacks.samples.sampler=null",
        *(
            ["data.subset_size=16"]
            if phase == "grid"
            else ["data.subset_size=64", "callbacks.samples.every_n_epochs=0"]
        ),
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "ddpm_lightning.cli.train", *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    deadline = time.monotonic() + 300
    ready = (
        (lambda: any("[samples] epoch 0: drawing 16 samples" in line for line in lines))
        if phase == "grid"
        else (lambda: (run / "checkpoints" / "last.ckpt").is_file())
    )
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None and ready(), "".join(lines)[-3000:]
    time.sleep(3 if phase == "grid" else 1)
    ranks = [
        proc.pid,
        *map(int, subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()),
    ]
    assert len(ranks) == 2, ranks
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)

    def alive(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
        except FileNotFoundError:
            return False

    while any(alive(pid) for pid in ranks) and time.monotonic() - start < 120:
        time.sleep(0.1)
    gone = time.monotonic() - start
    proc.wait(timeout=30)
    time.sleep(0.5)  # the reader thread drains the pipe
    return proc, lines, gone, ranks


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["grid", "train"])
def test_sigterm_ends_every_ddp_rank_within_seconds_in_the_grid_and_in_training(fake_mnist_root, tmp_path, phase):
    """Lightning 2.6's SIGTERM handler broadcasts from inside the handler: with rank zero drawing the grid alone and
    rank one in the checkpoint barrier, both ranks hung forever. Now every rank draws a share of the grid, the handler
    touches no collective, and both ranks end within seconds with one line and a non-zero exit."""
    proc, lines, gone, ranks = _sigterm_rank_zero(fake_mnist_root, tmp_path, phase)
    assert gone < 60, f"ranks {ranks} still alive {gone:.0f} s after SIGTERM"
    assert proc.returncode == 143, "".join(lines)[-3000:]
    errors = [line.strip() for line in lines if line.startswith("error:")]
    assert len(errors) == 2 and all(
        e.startswith("error: stopped by SIGTERM; the newest complete checkpoint is kept") for e in errors
    ), "".join(lines)[-3000:]
    assert not any("Traceback" in line for line in lines)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    if phase == "train":  # the hint resumes: the same command with the checkpoint it names
        state = torch.load(last, map_location="cpu", weights_only=True)
        assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())
        assert f"(resume with ckpt_path={last})" in errors[0]
        resumed = _cli(
            [
                "trainer=ddp_sim",
                *TINY_TRAIN,
                "data.subset_size=64",
                f"trainer.max_epochs={state['epoch'] + 2}",
                f"data.root={fake_mnist_root}",
                f"run_dir={tmp_path / 'run'}",
                f"ckpt_path={last}",
                f"hydra.run.dir={tmp_path / 'hydra2'}",
            ],
            cwd=tmp_path,
        )
        assert resumed.returncode == 0, resumed.stderr[-3000:]


def test_sample_across_ranks_is_the_single_process_sample_with_one_rank():
    from types import SimpleNamespace

    from ddpm_lightning.callbacks import sample_across_ranks
    from ddpm_lightning.module import DDPM
    from ddpm_lightning.networks import ADMUNetEps
    from ddpm_lightning.samplers import DDIMSampler
    from ddpm_lightning.schedule import NoiseSchedule

    model = DDPM(
        net=ADMUNetEps(model_channels=32, channel_mult=(1,), num_blocks=1, attn_resolutions=()),
        schedule=NoiseSchedule(timesteps=20),
    )
    sampler = DDIMSampler(steps=4)
    # 4 DDIM steps, 3 frames: x_t every 4 // (3 - 1) = 2 steps, for all 5 samples
    x0, frames = sample_across_ranks(
        SimpleNamespace(world_size=1, global_rank=0), model, 5, 11, sampler, trajectory_frames=3, trajectory_rows=5
    )
    out = model.sample(5, generator=torch.Generator().manual_seed(11), sampler=sampler, trajectory_every=2)
    torch.testing.assert_close(x0, out.x0)
    assert len(frames) == len(out.trajectory) and all(
        torch.equal(a, b) for a, (_, b) in zip(frames, out.trajectory, strict=True)
    )


@pytest.mark.slow
def test_a_rank_that_dies_ends_the_other_with_one_line_and_a_non_zero_exit(fake_mnist_root, tmp_path):
    import threading
    import time

    run = tmp_path / "run"
    args = [
        "trainer=ddp_sim",
        *TINY_TRAIN,
        "data.subset_size=64",
        "trainer.max_epochs=50",
        "callbacks.samples.every_n_epochs=0",
        f"data.root={fake_mnist_root}",
        f"run_dir={run}",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "ddpm_lightning.cli.train", *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    deadline = time.monotonic() + 300
    while not (run / "checkpoints" / "last.ckpt").is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    child = int(subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()[0])
    start = time.monotonic()
    os.kill(child, signal.SIGKILL)  # rank 1 dies without a word
    proc.wait(timeout=60)
    assert time.monotonic() - start < 60 and proc.returncode == 1
    time.sleep(0.5)
    errors = [line.strip() for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: this DDP rank stops because another rank ended (")
    assert not any(line.startswith("Traceback") for line in lines), "".join(lines)[-3000:]


_OBSERVER_WINS = """
import os, subprocess, sys
from ddpm_lightning.signals import PeerWatch
child = subprocess.Popen([sys.executable, "-c", "import os; os.kill(os.getpid(), 9)"])
child.wait()
PeerWatch(main_pid=os.getpid(), child_processes=[child])._run()  # as Lightning's observer thread does every 5 s
print("not reached")
"""


_OBSERVER_AFTER_SIGTERM = """
import os, subprocess, sys, time
from ddpm_lightning import signals
signals.SIGTERM_RECEIVED.set()  # as SafeSignalConnector does when rank zero gets SIGTERM
child = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(143)"])  # the child leaves as forwarded
child.wait()
watch = signals.PeerWatch(main_pid=os.getpid(), child_processes=[child], sleep_period=0)
watch.grace_s = float(sys.argv[1])
watch.start()
time.sleep(1.0)  # rank zero's own teardown after the SIGTERM, slower than the observer's poll
print("main ends by itself", flush=True)
sys.exit(143)
"""


@pytest.mark.slow
@pytest.mark.parametrize("grace_s", [30.0, 0.1])
def test_after_a_sigterm_the_observer_lets_rank_zero_end_by_itself_then_ends_it_with_143(grace_s):
    """CI race (11dabb8): rank zero forwarded SIGTERM, the child left with 143 while rank zero was still tearing
    down, and PeerWatch took it for a dead peer (status 1, a second wrong line). Now it waits ``grace_s`` for rank
    zero's own 143; only a rank zero that does not end in time is ended by PeerWatch, with the SIGTERM line and 143."""
    proc = subprocess.run(
        [sys.executable, "-c", _OBSERVER_AFTER_SIGTERM, str(grace_s)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert "another rank ended" not in proc.stderr
    if grace_s > 1:
        assert proc.stdout.strip() == "main ends by itself" and "error:" not in proc.stderr, proc.stderr[-2000:]
    else:
        assert "main ends by itself" not in proc.stdout
        assert proc.stderr.strip().splitlines()[-1] == (
            "error: stopped by SIGTERM; the newest complete checkpoint is "
            "kept (this rank did not end within 0.1 s of its DDP children)"
        )


@pytest.mark.slow
def test_when_lightnings_child_observer_notices_a_dead_rank_first_rank_zero_still_ends_with_one_line_and_1():
    """The race the test above can lose under load: Lightning's observer (5 s polls) sees the dead child before rank
    zero's collective fails. It used to SIGKILL rank zero (status -9, no word); PeerWatch ends it with the line
    and 1."""
    proc = subprocess.run(
        [sys.executable, "-c", _OBSERVER_WINS],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: this DDP rank stops because another rank ended (a local DDP "
        "child exited with status -9); that rank's own message says why"
    )
    assert "not reached" not in proc.stdout
