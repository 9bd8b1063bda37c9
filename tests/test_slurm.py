"""Issue 27: ``ddpm-train -m hydra/launcher=slurm_cpu ...`` against a real single-node Slurm cluster
(``sudo ci/slurm/start.sh``: partitions ``debug``, preemptible with GraceTime, and ``high``), as a user types it.

Each test prints, for each job, the ``sacct`` states of its attempts, its restarts, and the global step before and
after each requeue (run ``pytest -s tests/test_slurm.py`` to see them). The tests skip, with the reason, where no
cluster answers. Timings: see README "Clusters".
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from mnist_fixtures import write_fake_mnist

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

#: Fake MNIST images: the time-limit test's epoch (1,024 steps of batch 8); the other tests take the first 256.
N_TRAIN = 8192
BATCH = 8
#: The time-limit test trains this many seconds in all (Lightning's max_time, counted across requeues).
TRAIN_SECONDS = 50
#: What every job gets besides its own overrides: the tiny network, one CPU thread, a log line per step.
COMMON = [
    "hydra/launcher=slurm_cpu",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=1",
    "ckpt_path=last",
    "model=adm_tiny",
    f"data.batch_size={BATCH}",
    "data.val_size=8",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
    "callbacks.samples.every_n_epochs=0",
    "callbacks.samples.num_samples=4",
    "callbacks.samples.trajectory_samples=0",
    "callbacks.samples.sampler={_target_: ddpm_lightning.samplers.DDIMSampler, steps: 4}",
]
STATE_DIR = Path("/run/ddpm-slurm")


def _no_cluster_reason() -> str | None:
    why = ""
    if (STATE_DIR / "failed").is_file():
        why = f" (ci/slurm/start.sh: {(STATE_DIR / 'failed').read_text().strip()})"
    if shutil.which("sinfo") is None:
        return f"no Slurm cluster: sinfo is not installed; start one with `sudo ci/slurm/start.sh`{why}"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P %a %t"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return f"no Slurm cluster: sinfo did not answer within 15 s; start one with `sudo ci/slurm/start.sh`{why}"
    if out.returncode != 0 or not re.search(r"^debug\* up (idle|mix|alloc)", out.stdout, re.M):
        text = (out.stderr or out.stdout).strip().splitlines()
        return (
            f"no Slurm cluster with an idle `debug` partition: sinfo says {text[:1]}; start one with "
            f"`sudo ci/slurm/start.sh`{why}"
        )
    if shutil.which("srun") is None:
        return "no srun on PATH (submitit needs it)"
    return None


@pytest.fixture(scope="module", autouse=True)
def cluster() -> None:
    reason = _no_cluster_reason()
    if reason:
        pytest.skip(reason)
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_fake_mnist(tmp_path_factory.mktemp("mnist"), n_train=N_TRAIN)


def _ddpm_train() -> list[str]:
    script = Path(sys.executable).parent / "ddpm-train"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "ddpm_lightning.cli.train"]


def _run(*cmd: str, timeout: float = 30) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True).stdout


class Sweep:
    """``ddpm-train -m <COMMON> <overrides>`` started in the background, with its submitit folder."""

    def __init__(self, base: Path, name: str, data_root: Path, overrides: list[str]) -> None:
        self.dir = base / name
        self.started = time.monotonic()
        cmd = [*_ddpm_train(), "-m", *COMMON, f"data.root={data_root}", f"hydra.sweep.dir={self.dir}", *overrides]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
        self.proc = subprocess.Popen(
            cmd, cwd=base, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(
            target=lambda: self.lines.extend(iter(self.proc.stdout.readline, "")), daemon=True
        )
        self._reader.start()

    def output(self) -> str:
        return "".join(self.lines)[-4000:]

    def jobs(self, count: int, timeout: float = 60) -> list[str]:
        """The Slurm ids of this sweep's ``count`` jobs (``<array>_<i>`` for a sweep of several points)."""
        folder = self.dir / ".submitit"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [p.name for p in folder.glob("*") if re.fullmatch(r"\d+(_\d+)?", p.name)]
            if any("_" in name for name in found):  # an array: <array>/ holds only its submission script
                found = [name for name in found if "_" in name]
            found.sort(key=lambda j: [int(x) for x in j.split("_")])
            if len(found) >= count:
                return found[:count]
            assert self.proc.poll() is None, self.output()
            time.sleep(0.2)
        raise AssertionError(f"{count} job(s) not submitted in {timeout} s:\n{self.output()}")

    def run_dir(self, index: int = 0) -> Path:
        return self.dir / str(index)

    def log(self, job: str, task: int = 0) -> str:
        """The job's stderr over all its attempts (submitit appends)."""
        path = self.dir / ".submitit" / job / f"{job}_{task}_log.err"
        return path.read_text(errors="replace") if path.is_file() else ""

    def finish(self, timeout: float = 240) -> int:
        self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return self.proc.returncode

    def wait_for(self, ready, what: str, timeout: float = 120, parent: bool = True) -> None:
        """Poll ``ready()``; ``parent``: the sweep process must still be waiting meanwhile."""
        deadline = time.monotonic() + timeout
        while not ready():
            assert not parent or self.proc.poll() is None, f"{what}: the sweep ended first\n{self.output()}"
            assert time.monotonic() < deadline, f"{what}: not within {timeout} s\n{self.output()}"
            time.sleep(0.1)


def attempts(job: str, timeout: float = 60) -> list[str]:
    """``sacct``'s ``State ExitCode`` of each attempt of ``job`` (``--duplicates``: a requeued attempt is its own
    record), once the last one has ended (the sweep can see a job's result before Slurm records its end)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = _run("sacct", "-j", job, "--duplicates", "-X", "-n", "-P", "-o", "JobID,State,ExitCode").splitlines()
        states = [f"{state} {code}" for jid, state, code in (r.split("|") for r in rows) if jid == job]
        if (
            states and states[-1].split()[0] not in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING")
        ) or time.monotonic() > deadline:
            return states
        time.sleep(0.5)


def restarts(job: str) -> int | None:
    """``Restarts=`` of ``scontrol show job`` (None once the record has left slurmctld: MinJobAge)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30)
    found = re.search(r"\bRestarts=(\d+)", out.stdout)
    return int(found.group(1)) if found else None


def step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def report(test: str, job: str, **facts: object) -> None:
    text = ", ".join(f"{k}={v}" for k, v in facts.items())
    print(f"\n[{test}] job {job}: sacct {attempts(job)}, restarts {restarts(job)}; {text}", flush=True)


def requeue_lines(log: str) -> list[tuple[str, int]]:
    """``(path, step)`` of every ``requeued: ... saved <path> at step <n>`` line of a job's log."""
    return [(m.group(1), int(m.group(2))) for m in re.finditer(r"^requeued: .*?saved (\S+) at step (\d+);", log, re.M)]


def resumed_from(log: str) -> list[str]:
    """The checkpoint each restarted attempt resumed from (``ckpt_path=last: resuming from <path>``)."""
    return re.findall(r"(?:ckpt_path=last|in its own run_dir): resuming from (\S+)", log)


def check_run_dir(run: Path) -> None:
    """After any number of requeues: one best-*.ckpt, recorded by last.ckpt, that exists; one TensorBoard run."""
    bests = sorted((run / "checkpoints").glob("best-*.ckpt"))
    assert len(bests) == 1, bests
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    recorded = [v["best_model_path"] for k, v in state["callbacks"].items() if "val/loss" in k]
    assert recorded == [str(bests[0])], (recorded, bests)
    assert [p.name for p in run.iterdir() if "tensorboard" in p.name or p.name == "lightning_logs"] == ["tensorboard"]
    assert not list((run / "tensorboard").glob("version_*"))


def _log(sweep: Sweep, job: str, tasks: int = 1) -> str:
    """stdout and stderr of the job's first ``tasks`` tasks, over all its attempts."""
    out = ""
    for task in range(tasks):
        for suffix in ("out", "err"):
            path = sweep.dir / ".submitit" / job / f"{job}_{task}_log.{suffix}"
            out += path.read_text(errors="replace") if path.is_file() else ""
    return out


def test_a_beta_sweep_completes_and_a_job_requeued_mid_epoch_resumes_at_its_step(tmp_path, data_root):
    """Two jobs (a job array); `scontrol requeue` of job 0 mid-epoch: Slurm sends SIGTERM (Restarts already counts
    the requeue), the job saves at the next batch boundary and leaves with 75; Slurm starts it again in the same run
    dir, it resumes there and ends at the step of an uninterrupted run, as job 1 does. `ckpt_path=last` is typed;
    without it the requeued job resumes too (tests/test_requeue.py)."""
    epochs, per_epoch = 2, 256 // BATCH
    sweep = Sweep(
        tmp_path,
        "sweep",
        data_root,
        ["data.subset_size=256", f"trainer.max_epochs={epochs}", "schedule.beta_end=0.02,0.1"],
    )
    first, second = sweep.jobs(2)
    last = sweep.run_dir(0) / "checkpoints" / "last.ckpt"
    sweep.wait_for(last.is_file, f"job {first} wrote no last.ckpt")
    time.sleep(1.0)
    before = step(last)
    _run("scontrol", "requeue", first)
    assert sweep.finish() == 0, sweep.output()
    log = _log(sweep, first)
    [(hpc, saved)] = requeue_lines(log)
    assert (
        f"requeued: Slurm job {first} is being requeued (SIGTERM, the job is requeued); saved {hpc} at step "
        f"{saved}; the requeued job resumes it" in log
    )
    assert resumed_from(log) == [hpc] and saved > before, log[-3000:]
    assert step(last) == step(sweep.run_dir(1) / "checkpoints" / "last.ckpt") == epochs * per_epoch
    assert attempts(first) == ["REQUEUED 0:0", "COMPLETED 0:0"] and attempts(second) == ["COMPLETED 0:0"]
    assert restarts(first) == 1 and restarts(second) == 0
    report("sweep+scontrol requeue", first, last_ckpt_before=before, saved_and_resumed_at=saved, final=step(last))
    report("sweep+scontrol requeue", second, final=step(sweep.run_dir(1) / "checkpoints" / "last.ckpt"))
    for i in (0, 1):
        check_run_dir(sweep.run_dir(i))
    print(f"[sweep+scontrol requeue] wall {time.monotonic() - sweep.started:.0f} s")


def test_a_preempted_two_task_ddp_job_resumes_on_both_ranks_and_scancel_ends_both_tasks(tmp_path, data_root):
    """trainer=ddp_sim on 2 Slurm tasks, preempted mid-epoch by a `high` job (PreemptMode=REQUEUE, GraceTime=30):
    both tasks get SIGTERM with the job's PreemptTime set; both agree on one batch boundary, save, and rank 0
    requeues the job, instead of exiting 143 and being recorded FAILED. The high job runs; the requeued job resumes
    on both ranks and trains on; `scancel` then ends both tasks, each with one line, and srun reports exit 143."""
    per_epoch = 256 // (BATCH * 2)
    sweep = Sweep(
        tmp_path,
        "ddp",
        data_root,
        ["data.subset_size=256", "trainer=ddp_sim", "hydra.launcher.tasks_per_node=2", "trainer.max_epochs=200"],
    )
    [job] = sweep.jobs(1)
    last = sweep.run_dir(0) / "checkpoints" / "last.ckpt"
    sweep.wait_for(last.is_file, f"job {job} wrote no last.ckpt")
    time.sleep(1.0)
    before = step(last)
    high = _run(
        "sbatch", "--parsable", "-p", "high", "--exclusive", "-t", "1", "-o", "/dev/null", "--wrap", "sleep 1"
    ).strip()
    sweep.wait_for(lambda: len(resumed_from(_log(sweep, job, tasks=2))) == 2, "the requeued job did not resume")
    log = _log(sweep, job, tasks=2)
    [(hpc, saved), (hpc1, saved1)] = requeue_lines(log)  # rank 0 and rank 1: the same file, the same step
    assert (hpc1, saved1) == (hpc, saved) and saved > before, log[-3000:]
    assert f"requeued: Slurm job {job} requeued (SIGTERM, the job is preempted); saved {hpc} at step {saved}" in log
    assert resumed_from(log) == [hpc, hpc] and not re.search(r"^error:", log, re.M), log[-3000:]
    sweep.wait_for(lambda: step(last) > saved, "no checkpoint after the resume", timeout=60)
    after = step(last)
    assert after % per_epoch == 0
    _run("scancel", job)
    states = attempts(job)
    sweep.proc.terminate()  # the sweep would wait 15 s for the cancelled job's result, then report it

    def exited_143() -> set[str]:  # srun, in task 0's log after the requeue's 75s: "tasks 0-1: ..." or per task
        text = _log(sweep, job).split("Exited with exit code 75")[-1]
        found = re.findall(r"^srun: error: \S+: tasks? ([0-9,-]+): Exited with exit code 143$", text, re.M)
        return {task for tasks in found for task in ("0", "1") if tasks in (task, "0-1")}

    sweep.wait_for(
        lambda: exited_143() == {"0", "1"}, "srun did not report exit 143 for both tasks", timeout=60, parent=False
    )
    for task in (0, 1):
        text = (sweep.dir / ".submitit" / job / f"{job}_{task}_log.err").read_text(errors="replace")
        assert [line for line in text.splitlines() if line.startswith("error:")] == [
            f"error: stopped by SIGTERM; the newest complete checkpoint is kept (resume with ckpt_path={last})"
        ], text[-3000:]
    assert states == ["REQUEUED 0:0", "CANCELLED by 0 0:0"] and attempts(high) == ["COMPLETED 0:0"], states
    step_rows = _run("sacct", "-j", job, "--duplicates", "-n", "-P", "-o", "JobID,State,ExitCode").split()
    report(
        "ddp preemption+scancel",
        job,
        preempted_by=high,
        last_ckpt_before=before,
        saved_and_resumed_at=saved,
        after_resume=after,
        steps=step_rows,
    )
    check_run_dir(sweep.run_dir(0))
    sweep.finish(timeout=60)
    print(f"[ddp preemption+scancel] wall {time.monotonic() - sweep.started:.0f} s")


def test_a_job_whose_epoch_outlasts_its_allocation_finishes_over_requeues_at_the_warning_signal(tmp_path, data_root):
    """--time=1 (Slurm's least) with the warning 10 s before it (#SBATCH --signal=USR2@10; Slurm sends it up to its
    30 s check period early, so 20-50 s into each attempt). One epoch is longer than the whole allocation; the run
    trains TRAIN_SECONDS in all (+trainer.max_time, whose clock Lightning keeps in the checkpoint), more than one
    allocation leaves before its warning. At each warning the job saves mid-epoch and requeues itself; each attempt
    resumes from the previous one's checkpoint, and the job completes (before: every attempt restarted at the same
    step until submitit gave up)."""
    per_epoch = N_TRAIN // BATCH
    sweep = Sweep(
        tmp_path,
        "timelimit",
        data_root,
        [
            "hydra.launcher.timeout_min=1",
            "hydra.launcher.signal_delay_s=10",
            "trainer.max_epochs=1",
            f'+trainer.max_time="00:00:00:{TRAIN_SECONDS:02d}"',
            "trainer.val_check_interval=50",
            "trainer.check_val_every_n_epoch=null",
        ],
    )
    [job] = sweep.jobs(1)
    assert sweep.finish(timeout=600) == 0, sweep.output()
    log = _log(sweep, job)
    saves = requeue_lines(log)
    assert saves and all(
        "(SIGUSR2, Slurm's warning before the time limit)" in line
        for line in log.splitlines()
        if line.startswith("requeued:")
    ), log[-3000:]
    assert resumed_from(log) == [path for path, _ in saves]  # each attempt from the previous one's checkpoint
    steps = [saved for _, saved in saves]
    last = sweep.run_dir(0) / "checkpoints" / "last.ckpt"
    final = step(last)
    assert steps == sorted(set(steps)) and 0 < steps[0] and steps[-1] < final < per_epoch, (steps, final)
    assert "Time limit reached." in log  # the run's own end: TRAIN_SECONDS of training, mid-epoch
    epoch_s = per_epoch / (final / TRAIN_SECONDS)
    assert epoch_s > 60, f"at {final / TRAIN_SECONDS:.1f} steps/s an epoch takes {epoch_s:.0f} s: raise N_TRAIN"
    states = attempts(job)
    assert states == ["REQUEUED 0:0"] * len(saves) + ["COMPLETED 0:0"], states
    assert restarts(job) == len(saves)
    report(
        "time limit",
        job,
        saved_and_resumed_at=steps,
        final=final,
        steps_per_epoch=per_epoch,
        epoch_seconds=round(epoch_s),
    )
    check_run_dir(sweep.run_dir(0))
    print(f"[time limit] wall {time.monotonic() - sweep.started:.0f} s")
