"""What a ``ddpm-train`` job needs to know about the Slurm job it runs in (no Lightning import here).

* :func:`job_id`, :func:`requeue_id`, :func:`restart_count`: from the environment Slurm gives every task.
* :func:`sigterm_cause`: why Slurm sent SIGTERM: ``"preempted"`` (the job's ``PreemptTime`` is set: the partition's
  ``GraceTime`` is running and the job may save and requeue itself), ``"requeued"`` (``scontrol requeue``: Slurm
  starts the job again by itself) or None (``scancel``, the time limit, anything else: the job ends).
* :func:`requeue`: ``scontrol requeue <job>``, as submitit's and Lightning's handlers do.
* :func:`catch_warning_signals`, :data:`REQUEST`: Slurm's warning signal (SIGUSR1 / SIGUSR2) only records a request.
* :func:`check_tasks` (inside the job) and :func:`check_launcher` (before ``ddpm-train -m hydra/launcher=slurm``
  submits anything): a ``trainer.devices`` / ``num_nodes`` that does not match the job's tasks is one line, not
  Lightning's exception once the job runs.

See :mod:`ddpm_lightning.requeue` for what the job does with these, and README "Clusters".
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import FrameType
from typing import Any

from ddpm_lightning.errors import invalid, is_int

log = logging.getLogger(__name__)

#: Seconds a ``scontrol`` call may take (a controller that does not answer must not hang a signal's handling).
SCONTROL_TIMEOUT_S = 10.0


def job_id(environ: Mapping[str, str] | None = None) -> str | None:
    """``SLURM_JOB_ID`` (this task's own job id, also for an array task), or None outside a Slurm job."""
    return (environ if environ is not None else os.environ).get("SLURM_JOB_ID") or None


def requeue_id(environ: Mapping[str, str] | None = None) -> str | None:
    """The id ``scontrol requeue`` and ``sacct`` name this job by: ``<array job>_<task>`` for an array task (a
    ``ddpm-train -m`` sweep), else ``SLURM_JOB_ID``; None outside Slurm."""
    env = environ if environ is not None else os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return job_id(env)


def restart_count(environ: Mapping[str, str] | None = None) -> int:
    """How many times Slurm has started this job before (``SLURM_RESTART_COUNT``; 0 for a first start)."""
    value = (environ if environ is not None else os.environ).get("SLURM_RESTART_COUNT", "0")
    return int(value) if value.isdigit() else 0


# ------------------------------------------------------------------------------------------ the warning signal
#: The signals Slurm sends ahead of the time limit: submitit's (``--signal=USR2@...``) and Lightning's default.
WARNING_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


@dataclass
class Request:
    """Set from signal handlers (plain attribute writes only), acted on at the next training-batch boundary by
    :class:`ddpm_lightning.requeue.RequeueCallback`."""

    reason: str | None = None  # why this rank was asked to save: "SIGUSR2, ...", "SIGTERM, the job is preempted"
    requeue: bool = True  # False when Slurm requeues the job itself (scontrol requeue)
    leaving: bool = False  # this job has been requeued: the SIGTERM that follows is expected
    after_fit: bool = False  # trainer.fit has ended: a warning goes to the handler that was there before


REQUEST = Request()
_PREVIOUS: dict[int, Any] = {}  # the handlers catch_warning_signals replaced (submitit's SIGUSR2 handler)


def _on_warning(signum: int, frame: FrameType | None) -> None:
    if REQUEST.after_fit:  # the checkpoint is final: let submitit requeue (the next attempt redoes what follows)
        previous = _PREVIOUS.get(signum)
        if callable(previous):
            previous(signum, frame)
        return
    if REQUEST.reason is None:
        REQUEST.reason = f"{signal.Signals(signum).name}, Slurm's warning before the time limit"
    log.warning("received %s: saving a checkpoint at the next batch boundary", signal.Signals(signum).name)


def catch_warning_signals(register: Callable[[int, Any], Any] = signal.signal) -> None:
    """In a Slurm job, make SIGUSR1 and SIGUSR2 only record a :data:`REQUEST` (no I/O, no collective).

    Called first thing in ``ddpm-train``'s body (before the seconds of imports and setup, where submitit's handler
    would requeue without any checkpoint) and again when ``trainer.fit`` registers its handlers (Lightning's
    ``_register_signal``; it restores this handler afterwards). After ``trainer.fit`` a warning goes to the handler
    found the first time (submitit's; see :func:`fit_ended`). Outside Slurm or outside the main thread: nothing.
    """
    if job_id() is None:
        return
    for signum in WARNING_SIGNALS:
        current = signal.getsignal(signum)
        if current is not _on_warning:
            _PREVIOUS.setdefault(signum, current)
        try:
            register(signum, _on_warning)
        except ValueError:  # not the main thread
            return


def fit_ended() -> None:
    """``trainer.fit`` is over (its last checkpoint written): from now on a warning signal goes to the handler
    :func:`catch_warning_signals` replaced; one that came too late for a batch boundary is passed on now."""
    REQUEST.after_fit = True
    pending = REQUEST.reason
    if pending and pending.startswith("SIGUSR"):
        REQUEST.reason = None
        _on_warning(getattr(signal, pending.split(",")[0]), None)


def ignore_warning_signals() -> None:
    """In a Slurm job whose ``ddpm-train`` body has returned: ignore the warning signal from now on. A warning that
    comes while the process exits (its work done, submitit's result written) would otherwise find the default
    action, which Python restores at exit, and Slurm would record the finished job as FAILED with exit code 12
    (seen on the test cluster)."""
    if job_id() is None:
        return
    for signum in WARNING_SIGNALS:
        try:
            signal.signal(signum, signal.SIG_IGN)
        except ValueError:  # not the main thread
            return


def show_job(job: str) -> dict[str, str]:
    """``scontrol show job -o <job>`` as ``{field: value}`` (empty when scontrol fails or does not answer)."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "job", "-o", job],
            capture_output=True,
            text=True,
            timeout=SCONTROL_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return {}
    if out.returncode != 0:
        return {}
    return dict(token.split("=", 1) for token in out.stdout.split() if "=" in token)


def sigterm_cause(fields: Mapping[str, str], restarts: int = 0) -> str | None:
    """Why Slurm sent this job SIGTERM, from :func:`show_job`'s fields while the signal is delivered.

    Seen on Slurm 22.05 (tests/test_slurm.py): preemption sends SIGTERM with ``JobState=SIGNALING`` and
    ``PreemptTime`` set; ``scontrol requeue`` with ``JobState=COMPLETING`` and ``Restarts`` already one more than the
    attempt's ``SLURM_RESTART_COUNT``; ``scancel`` and the time limit with ``JobState=COMPLETING`` and neither.

    Args:
        fields: ``scontrol show job`` of this job.
        restarts: this attempt's ``SLURM_RESTART_COUNT`` (:func:`restart_count`).

    Returns:
        ``"preempted"`` (a higher-priority job preempts it; with ``GraceTime`` the job has that long before Slurm
        requeues or cancels it), ``"requeued"`` (Slurm is requeuing it: it starts again by itself), else None.
    """
    if fields.get("PreemptTime", "None") not in ("None", "Unknown", "0", ""):
        return "preempted"
    count = fields.get("Restarts", "")
    if fields.get("JobState", "").startswith("REQUEUE") or (count.isdigit() and int(count) > restarts):
        return "requeued"
    return None


def requeue(job: str) -> tuple[bool, str]:
    """``scontrol requeue <job>``: Slurm ends this allocation (SIGTERM, then SIGKILL after ``KillWait``) and
    starts the job again with the same command, in the same Hydra run directory.

    Returns:
        ``(True, "")``, or ``(False, <scontrol's first line>)`` when Slurm refused (a job submitted with
        ``--no-requeue``, ``JobRequeue=0`` on the cluster, no scontrol).
    """
    try:
        out = subprocess.run(
            ["scontrol", "requeue", job], capture_output=True, text=True, timeout=SCONTROL_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.SubprocessError) as err:
        return False, f"{type(err).__name__}: {err}"
    if out.returncode == 0:
        return True, ""
    lines = (out.stderr or out.stdout).strip().splitlines()
    return False, lines[0] if lines else f"exit status {out.returncode}"


def _tasks_allowed(devices: Any, tasks: int) -> bool:
    if isinstance(devices, (list, tuple)):
        return len(devices) == tasks
    if is_int(devices):
        return devices == tasks or devices == -1  # -1: all visible GPUs (Lightning counts them)
    return True  # "auto" and other strings: Lightning decides


def check_tasks(trainer_cfg: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> None:
    """Inside a Slurm job: ``trainer.devices`` must equal the job's tasks per node and ``trainer.num_nodes`` its
    nodes (Lightning runs one rank per Slurm task), checked before anything trains.

    Raises:
        ConfigError: ``trainer.devices=1 is invalid: this Slurm job runs 2 tasks per node ...``.
    """
    env = environ if environ is not None else os.environ
    if not job_id(env) or env.get("SLURM_JOB_NAME") in ("bash", "interactive"):  # Lightning's own exemption
        return
    per_node = env.get("SLURM_NTASKS_PER_NODE", "")
    devices = trainer_cfg.get("devices", 1)
    if per_node.isdigit() and not _tasks_allowed(devices, int(per_node)):
        raise invalid(
            "trainer.devices",
            devices,
            f"this Slurm job runs {per_node} tasks per node (one per rank): set "
            f"trainer.devices={per_node}, or hydra.launcher.tasks_per_node to the devices per node",
        )
    nodes = env.get("SLURM_NNODES", "")
    num_nodes = trainer_cfg.get("num_nodes", 1)
    if nodes.isdigit() and is_int(num_nodes) and num_nodes != int(nodes):
        raise invalid(
            "trainer.num_nodes",
            num_nodes,
            f"this Slurm job has {nodes} node(s): set trainer.num_nodes={nodes} or hydra.launcher.nodes",
        )


def check_launcher(launcher: Mapping[str, Any], choice: str | None, trainer_cfg: Mapping[str, Any]) -> None:
    """Before ``ddpm-train -m hydra/launcher=slurm*`` submits a job: the launcher's tasks must fit the trainer.

    Args:
        launcher: the composed ``hydra.launcher`` node, *unresolved* (``tasks_per_node`` may be an interpolation).
        choice: the ``hydra/launcher`` option (``slurm``, ``slurm_cpu``, ...).
        trainer_cfg: the composed ``trainer`` node.

    Raises:
        ConfigError: ``hydra.launcher.gpus_per_node=0`` under ``hydra/launcher=slurm`` (one task per GPU: use
            ``hydra/launcher=slurm_cpu``); tasks per node or nodes that differ from ``trainer.devices`` /
            ``trainer.num_nodes``.
    """
    gpus = launcher.get("gpus_per_node")
    if choice == "slurm" and not (is_int(gpus) and gpus >= 1):
        raise invalid(
            "hydra.launcher.gpus_per_node",
            gpus,
            "must be an integer >= 1 with hydra/launcher=slurm (one "
            "task per GPU); on a CPU partition use hydra/launcher=slurm_cpu",
        )
    tasks = launcher.get("tasks_per_node")
    if is_int(tasks) and not _tasks_allowed(trainer_cfg.get("devices", 1), tasks):
        raise invalid(
            "trainer.devices",
            trainer_cfg.get("devices"),
            f"hydra.launcher.tasks_per_node={tasks} starts "
            f"{tasks} rank(s) per node: set trainer.devices={tasks} or hydra.launcher.tasks_per_node="
            f"{trainer_cfg.get('devices')}",
        )
    nodes, num_nodes = launcher.get("nodes", 1), trainer_cfg.get("num_nodes", 1)
    if is_int(nodes) and is_int(num_nodes) and nodes != num_nodes:
        raise invalid("trainer.num_nodes", num_nodes, f"hydra.launcher.nodes={nodes}: set trainer.num_nodes={nodes}")
