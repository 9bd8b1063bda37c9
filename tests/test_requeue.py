"""Issue 27 without a cluster: the requeue plan of ddpm_lightning/requeue.py and slurm.py, driven through a real
``ddpm-train`` process with Slurm's environment and a stand-in ``scontrol`` on PATH; the checks that name a Slurm
job's tasks; the ``best``/``last`` order. tests/test_slurm.py runs the same things on a real Slurm cluster."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ddpm_lightning import slurm
from ddpm_lightning.errors import ConfigError

from conftest import TINY_TRAIN, compose_train

# ------------------------------------------------------------------------------------------------------- slurm.py


def test_sigterm_cause_tells_preemption_and_requeue_from_scancel():
    assert slurm.sigterm_cause({"JobState": "RUNNING", "PreemptTime": "2026-12-02T18:00:00"}) == "preempted"
    # as Slurm 22.05 shows them while the SIGTERM is delivered (tests/test_slurm.py)
    assert (
        slurm.sigterm_cause({"JobState": "SIGNALING", "PreemptTime": "2026-12-02T18:13:03", "Restarts": "0"})
        == "preempted"
    )
    assert slurm.sigterm_cause({"JobState": "COMPLETING", "Restarts": "1"}, restarts=0) == "requeued"
    assert (
        slurm.sigterm_cause({"JobState": "COMPLETING", "Restarts": "2", "PreemptTime": "None"}, restarts=1)
        == "requeued"
    )
    assert slurm.sigterm_cause({"JobState": "REQUEUED", "PreemptTime": "None"}) == "requeued"
    assert slurm.sigterm_cause({"JobState": "COMPLETING", "PreemptTime": "None", "Restarts": "1"}, restarts=1) is None
    assert slurm.sigterm_cause({"JobState": "COMPLETING", "PreemptTime": "None", "Restarts": "0"}) is None
    assert slurm.sigterm_cause({}) is None  # scontrol did not answer: the SIGTERM ends the job


def test_job_ids_from_the_environment():
    assert slurm.job_id({}) is None and slurm.requeue_id({}) is None
    array = {"SLURM_JOB_ID": "31", "SLURM_ARRAY_JOB_ID": "30", "SLURM_ARRAY_TASK_ID": "1", "SLURM_RESTART_COUNT": "2"}
    assert slurm.job_id(array) == "31" and slurm.requeue_id(array) == "30_1" and slurm.restart_count(array) == 2
    assert slurm.requeue_id({"SLURM_JOB_ID": "9"}) == "9" and slurm.restart_count({"SLURM_JOB_ID": "9"}) == 0


def test_a_devices_tasks_mismatch_in_a_slurm_job_is_one_line():
    env = {"SLURM_JOB_ID": "5", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1"}
    with pytest.raises(ConfigError) as err:
        slurm.check_tasks({"devices": 1}, env)
    assert str(err.value) == (
        "trainer.devices=1 is invalid: this Slurm job runs 2 tasks per node (one per rank): set "
        "trainer.devices=2, or hydra.launcher.tasks_per_node to the devices per node"
    )
    slurm.check_tasks({"devices": 2}, env)
    slurm.check_tasks({"devices": -1}, env)  # all visible GPUs: Lightning counts them
    slurm.check_tasks({"devices": 1}, {})  # outside Slurm: nothing to check
    slurm.check_tasks({"devices": 1}, {**env, "SLURM_JOB_NAME": "interactive"})  # Lightning's exemption
    with pytest.raises(ConfigError, match=r"^trainer.num_nodes=1 is invalid: this Slurm job has 2 node\(s\)"):
        slurm.check_tasks({"devices": 2, "num_nodes": 1}, {**env, "SLURM_NNODES": "2"})


def test_the_slurm_launcher_is_checked_before_anything_is_submitted_and_its_hints_work():
    """hydra.launcher.gpus_per_node=0 or null under hydra/launcher=slurm used to fail in sbatch or in OmegaConf;
    trainer.devices against tasks_per_node used to fail in the job. Each hint, applied, passes."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from ddpm_lightning.cli.train import check_slurm_launcher

    sweep = ["-m", "schedule.beta_end=0.02,0.1"]
    for gpus in ("0", "null"):
        with pytest.raises(ConfigError) as err:
            check_slurm_launcher([*sweep, "hydra/launcher=slurm", f"hydra.launcher.gpus_per_node={gpus}"])
        assert str(err.value).endswith(
            "is invalid: must be an integer >= 1 with hydra/launcher=slurm (one task per "
            "GPU); on a CPU partition use hydra/launcher=slurm_cpu"
        )
        check_slurm_launcher([*sweep, "hydra/launcher=slurm_cpu", f"hydra.launcher.gpus_per_node={gpus}"])
    with pytest.raises(ConfigError) as err:
        check_slurm_launcher([*sweep, "hydra/launcher=slurm_cpu", "trainer=ddp_sim"])
    assert str(err.value) == (
        "trainer.devices=2 is invalid: hydra.launcher.tasks_per_node=1 starts 1 rank(s) per "
        "node: set trainer.devices=1 or hydra.launcher.tasks_per_node=2"
    )
    check_slurm_launcher([*sweep, "hydra/launcher=slurm_cpu", "trainer=ddp_sim", "trainer.devices=1"])
    check_slurm_launcher([*sweep, "hydra/launcher=slurm_cpu", "trainer=ddp_sim", "hydra.launcher.tasks_per_node=2"])
    check_slurm_launcher([*sweep, "hydra/launcher=slurm", "trainer=ddp", "hydra.launcher.gpus_per_node=4"])


def test_the_cpu_launcher_composes_without_gpus():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir

    from conftest import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["hydra/launcher=slurm_cpu", "trainer=ddp_sim", "hydra.launcher.tasks_per_node=2"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    resources = (launcher.gpus_per_node, launcher.tasks_per_node, launcher.cpus_per_task, launcher.mem_gb)
    assert resources == (None, 2, 4, 8)
    assert launcher.additional_parameters == {"requeue": True} and launcher.signal_delay_s == 120


# ------------------------------------------------------------------------------------ prepare_config (no training)


def _fake_checkpoint(path: Path, cfg) -> Path:
    """A file ``prepare_config`` accepts as a resume checkpoint of ``cfg`` (weights-only readable, same network)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"hyper_parameters": {"config": OmegaConf.to_container(cfg, resolve=True)}, "global_step": 3}, path)
    return path


def test_a_requeued_slurm_job_without_ckpt_path_last_resumes_its_own_run_dir(tmp_path, monkeypatch):
    """It used to be refused as 'from another run' about its own run: the lock file names the job that wrote it."""
    from ddpm_lightning.training import prepare_config

    run = tmp_path / "run"
    overrides = [*TINY_TRAIN, f"run_dir={run}"]
    last = _fake_checkpoint(run / "checkpoints" / "last.ckpt", compose_train(overrides))
    (run / ".ddpm-train.lock").write_text(json.dumps({"pid": 1, "host": "h", "started": "t", "slurm_job_id": "77"}))
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert prepare_config(compose_train(overrides)).ckpt_path == str(last.resolve())
    for env, value in [("SLURM_RESTART_COUNT", "0"), ("SLURM_JOB_ID", "78")]:  # a first start, another job: refused
        monkeypatch.setenv(env, value)
        with pytest.raises(ConfigError, match=r"already holds last.ckpt from another run; resume with ckpt_path=last"):
            prepare_config(compose_train(overrides))
        monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
        monkeypatch.setenv("SLURM_JOB_ID", "77")


def test_a_slurm_requeue_checkpoint_belongs_to_its_run_dir(tmp_path):
    """The SIGTERM line names <run>/hpc_ckpt_<n>.ckpt when it is the newest: resuming from it writes into <run>; a
    fresh run refuses a run_dir that holds one."""
    from ddpm_lightning.training import RunContext, prepare_config

    run = tmp_path / "run"
    hpc = _fake_checkpoint(run / "hpc_ckpt_2.ckpt", compose_train([*TINY_TRAIN, f"run_dir={run}"]))
    hydra_dir = str(tmp_path / "hydra")
    cfg = prepare_config(
        compose_train([*TINY_TRAIN, f"run_dir={hydra_dir}", f"ckpt_path={hpc}"]), RunContext(output_dir=hydra_dir)
    )
    assert cfg.run_dir == str(run.resolve())
    with pytest.raises(ConfigError, match=r"already holds hpc_ckpt_2.ckpt from another run"):
        prepare_config(compose_train([*TINY_TRAIN, f"run_dir={run}"]))


# ------------------------------------------------------------------------- a real ddpm-train with Slurm's environment

FAKE_SCONTROL = """#!/bin/sh
# scontrol for tests/test_requeue.py: records its arguments; `show job` answers from FAKE_PREEMPT_TIME
echo "$*" >> "$FAKE_SCONTROL_LOG"
case "$1" in
  show) echo "JobId=$SLURM_JOB_ID JobName=train JobState=RUNNING Reason=None PreemptTime=${FAKE_PREEMPT_TIME:-None}" ;;
  requeue) exit "${FAKE_REQUEUE_STATUS:-0}" ;;
esac
"""


class SlurmTask:
    """``ddpm-train`` started as Slurm would start a one-task job (its environment), with a stand-in scontrol."""

    def __init__(self, tmp_path: Path, fake_mnist_root: Path, args: list[str], restart: int = 0, **env: str) -> None:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir(exist_ok=True)
        (bin_dir / "scontrol").write_text(FAKE_SCONTROL)
        (bin_dir / "scontrol").chmod(0o755)
        self.log = tmp_path / "scontrol.log"
        self.run = tmp_path / "run"
        environ = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "FAKE_SCONTROL_LOG": str(self.log),
            "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NAME": "train",
            "SLURM_NTASKS": "1",
            "SLURM_NTASKS_PER_NODE": "1",
            "SLURM_NNODES": "1",
            "SLURM_PROCID": "0",
            "SLURM_LOCALID": "0",
            "SLURM_NODEID": "0",
            "SLURM_NODELIST": "localhost",
            "SLURM_RESTART_COUNT": str(restart),
            **env,
        }
        cmd = [
            sys.executable,
            "-m",
            "ddpm_lightning.cli.train",
            *TINY_TRAIN,
            "data.subset_size=64",
            "callbacks.samples.every_n_epochs=0",
            f"data.root={fake_mnist_root}",
            f"run_dir={self.run}",
            f"hydra.run.dir={tmp_path / f'hydra{restart}'}",
            *args,
        ]
        self.proc = subprocess.Popen(
            cmd, cwd=tmp_path, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(
            target=lambda: self.lines.extend(iter(self.proc.stdout.readline, "")), daemon=True
        )
        self._reader.start()

    def wait_for(self, ready, what: str, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while not ready() and self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready(), f"{what}:\n" + "".join(self.lines)[-3000:]

    def end(self, timeout: float = 120) -> int:
        self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return self.proc.returncode

    def one_line(self, label: str) -> str:
        found = [line.strip() for line in self.lines if line.startswith(f"{label}: ")]
        assert len(found) == 1, "".join(self.lines)[-3000:]
        return found[0]


def _step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


@pytest.mark.slow
def test_the_warning_signal_saves_mid_epoch_and_requeues_and_the_requeued_job_continues(fake_mnist_root, tmp_path):
    """SIGUSR2 (submitit's --signal=USR2@...): at the next batch boundary hpc_ckpt_1.ckpt is written, scontrol requeue
    4242 is called once, the job ends with `requeued: ...` and 75. Restarted (SLURM_RESTART_COUNT=1, no ckpt_path),
    the job resumes that checkpoint in the same run dir and ends at the step of an uninterrupted run."""
    task = SlurmTask(tmp_path, fake_mnist_root, ["trainer.max_epochs=40"])
    last = task.run / "checkpoints" / "last.ckpt"
    task.wait_for(last.is_file, "no last.ckpt")
    time.sleep(0.3)
    task.proc.send_signal(signal.SIGUSR2)
    assert task.end() == 75, "".join(task.lines)[-3000:]
    hpc = task.run / "hpc_ckpt_1.ckpt"
    step = _step(hpc)
    line = task.one_line("requeued")
    assert line == (
        f"requeued: Slurm job 4242 requeued (SIGUSR2, Slurm's warning before the time limit); saved {hpc} "
        f"at step {step}; the requeued job resumes it"
    )
    assert task.log.read_text().splitlines() == ["requeue 4242"]
    assert 8 <= _step(last) <= step < 320, (step, _step(last))  # 8 steps per epoch
    print(f"\nSIGUSR2: hpc_ckpt_1.ckpt at global step {step} (last.ckpt at {_step(last)})")

    again = SlurmTask(
        tmp_path, fake_mnist_root, ["trainer.max_epochs=6"] if step < 40 else ["trainer.max_epochs=80"], restart=1
    )
    assert again.end(timeout=300) == 0, "".join(again.lines)[-3000:]
    text = "".join(again.lines)
    assert f"Slurm job 4242 restarted (SLURM_RESTART_COUNT=1) in its own run_dir: resuming from {hpc}" in text
    final = _step(last)
    assert final == (48 if step < 40 else 640), final
    assert len(list(task.run.glob("tensorboard/events.out.tfevents.*"))) >= 1
    assert len(list((task.run / "checkpoints").glob("best-*.ckpt"))) == 1
    print(f"resumed at step {step}, ended at step {final}")


@pytest.mark.slow
def test_preemption_saves_and_requeues_while_scancel_ends_with_143_naming_the_newest_checkpoint(
    fake_mnist_root, tmp_path
):
    """SIGTERM with the job's PreemptTime set (preemption, GraceTime running): save and requeue, exit 75. A refused
    requeue (--no-requeue) keeps training; a later plain SIGTERM (scancel) ends it with 143 and one line naming the
    newest checkpoint: the requeue checkpoint, newer than last.ckpt."""
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
    preempted = SlurmTask(
        tmp_path / "a", fake_mnist_root, ["trainer.max_epochs=40"], FAKE_PREEMPT_TIME="2026-12-02T18:00:00"
    )
    preempted.wait_for((preempted.run / "checkpoints" / "last.ckpt").is_file, "no last.ckpt")
    preempted.proc.send_signal(signal.SIGTERM)
    assert preempted.end() == 75, "".join(preempted.lines)[-3000:]
    line = preempted.one_line("requeued")
    assert line.startswith("requeued: Slurm job 4242 requeued (SIGTERM, the job is preempted); saved ")
    assert preempted.log.read_text().splitlines() == ["show job -o 4242", "requeue 4242"]

    refused = SlurmTask(tmp_path / "b", fake_mnist_root, ["trainer.max_epochs=40"], FAKE_REQUEUE_STATUS="1")
    refused.wait_for((refused.run / "checkpoints" / "last.ckpt").is_file, "no last.ckpt")
    refused.proc.send_signal(signal.SIGUSR1)  # Lightning's default warning signal: the same plan
    hpc = refused.run / "hpc_ckpt_1.ckpt"
    refused.wait_for(
        lambda: any(line.startswith("warning: could not requeue") for line in refused.lines),
        "no warning about the refused requeue",
    )
    step = _step(hpc)
    time.sleep(1.0)  # it goes on training
    assert refused.proc.poll() is None, "".join(refused.lines)[-3000:]
    refused.proc.send_signal(signal.SIGTERM)  # scancel: PreemptTime=None
    assert refused.end() == 143, "".join(refused.lines)[-3000:]
    newest = max([refused.run / "checkpoints" / "last.ckpt", hpc], key=lambda p: p.stat().st_mtime_ns)
    assert refused.one_line("error") == (
        f"error: stopped by SIGTERM; the newest complete checkpoint is kept (resume with ckpt_path={newest})"
    )
    print(f"\nrefused requeue: hpc_ckpt_1.ckpt at step {step}, training went on; SIGTERM named {newest.name}")


# --------------------------------------------------------------------------------------------------- best and last


@pytest.mark.slow
def test_resuming_from_last_keeps_exactly_one_best_checkpoint_that_exists(fake_mnist_root, tmp_path):
    """`last` used to be saved before `best` at each epoch end: every resume restored a best callback pointing at a
    deleted file and left one more best-*.ckpt behind."""
    from ddpm_lightning.training import train

    run = tmp_path / "run"
    base = [
        *TINY_TRAIN,
        "callbacks.samples.every_n_epochs=0",
        f"data.root={fake_mnist_root}",
        f"run_dir={run}",
        "ckpt_path=last",
    ]
    for epochs in (2, 3, 4):
        result = train(compose_train([*base, f"trainer.max_epochs={epochs}"]))
    bests = sorted((run / "checkpoints").glob("best-*.ckpt"))
    assert [p.name for p in bests] == [result["best_ckpt"].name], bests
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    recorded = [v["best_model_path"] for k, v in state["callbacks"].items() if "val/loss" in k]
    assert recorded == [str(bests[0])] and Path(recorded[0]).is_file()
