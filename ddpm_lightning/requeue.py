"""Slurm's warning signal and preemption: every rank saves at the same batch boundary, then rank zero requeues.

The plan (README "Clusters", :mod:`ddpm_lightning.signals`):

* **Before the time limit** Slurm sends the warning signal the job asked for: ``hydra/launcher=slurm`` submits with
  submitit's ``#SBATCH --signal=USR2@<signal_delay_s>``; a hand-written script may use Lightning's
  ``--signal=SIGUSR1@90``. In a Slurm job, both only record a request
  (:func:`ddpm_lightning.slurm.catch_warning_signals`: no I/O, no collective), from the start of ``ddpm-train``'s
  body until ``trainer.fit`` ends; a warning during the imports and setup is acted on at the first batch. This
  replaces Lightning's SIGUSR1 handler (it saves and requeues inside the handler, a collective under DDP) and
  submitit's SIGUSR2 handler (it requeues without any checkpoint). After fit (the checkpoint is final) the warning
  goes to submitit's handler again, which requeues the job (the next attempt redoes the end-of-run evaluation).
* **Preemption** with the partition's ``GraceTime``: Slurm sends SIGTERM, as ``scancel`` does. The SIGTERM handler
  (:mod:`ddpm_lightning.signals`) asks Slurm (:func:`defer_sigterm`): a preempted job (``PreemptTime`` set) or one
  being requeued (``scontrol requeue``) records the request like the warning signal and goes on to the next batch
  boundary; any other SIGTERM (``scancel``, the time limit itself) ends the job at once with exit status 143.
* **Who saves**: :class:`RequeueCallback`, at the end of every training batch. Under DDP every rank adds its own
  request to one ``all_reduce`` there (every rank reaches that point in the same step), so all ranks agree on the
  step, all call ``trainer.save_checkpoint`` (Lightning's ``<run_dir>/hpc_ckpt_<n>.ckpt``; rank zero writes it,
  atomically, and deletes the older ones), and all stop together.
* **Who requeues**: ``ddpm-train``'s rank zero, once, with ``scontrol requeue`` (:func:`ddpm_lightning.slurm.requeue`)
  after the checkpoint is complete; not submitit, not Lightning. A job already being requeued by Slurm is not
  requeued again. The requeued job runs the same command in the same Hydra run directory, and ``ckpt_path=last``
  (or, for a requeued job, ``ckpt_path=null``: see :func:`ddpm_lightning.training.prepare_config`) resumes the
  newest of ``last.ckpt`` and ``hpc_ckpt_*.ckpt``.
* At the time limit, a job that has trained no step since it started is not requeued again (it would only loop); one
  whose requeue Slurm refuses (``--no-requeue``) keeps training with its checkpoint saved. The job that requeued
  itself ends every rank with ``requeued: ...`` on stderr and exit status 75 (EX_TEMPFAIL), and no result for
  submitit, whose sweep waits for the requeued attempt.

Outside a Slurm job none of this is installed.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L

from ddpm_lightning import slurm
from ddpm_lightning.errors import ProjectError

log = logging.getLogger(__name__)

#: Exit status of a job that has requeued itself (sysexits.h EX_TEMPFAIL: the work continues in the requeued job).
EXIT_REQUEUED = 75


class Requeued(ProjectError):
    """This job saved a checkpoint and requeued itself (or was being requeued by Slurm); every rank ends with the
    one line ``requeued: ...`` and exit status :data:`EXIT_REQUEUED`."""

    exit_status = EXIT_REQUEUED
    label = "requeued"


REQUEST = slurm.REQUEST


def in_slurm_job() -> bool:
    """Whether this process is a task of a Slurm job (then the requeue plan applies)."""
    return slurm.job_id() is not None


def register(register_signal: Callable[[int, Any], None]) -> None:
    """When ``trainer.fit`` registers its handlers: in a Slurm job, SIGUSR1 and SIGUSR2 only record a request
    (:func:`ddpm_lightning.slurm.catch_warning_signals`, with Lightning's ``_register_signal``: main thread only);
    Lightning restores the previous handlers after fit."""
    REQUEST.leaving = REQUEST.after_fit = False
    slurm.catch_warning_signals(register_signal)


def defer_sigterm() -> bool:
    """Called by the SIGTERM handler first: True when this SIGTERM must not end the job now.

    * The job has requeued itself: the SIGTERM is Slurm ending this allocation; the ranks are already leaving.
    * Slurm preempts the job (``PreemptTime`` set) or requeues it (``scontrol requeue``): record a request, so that
      every rank saves at the next batch boundary (within ``GraceTime`` / ``KillWait``) and the job requeues itself.

    Any other SIGTERM (``scancel``, the time limit, outside Slurm): False, the job ends now.
    """
    if REQUEST.leaving:
        log.warning("received SIGTERM after this job was requeued: leaving")
        return True
    job = slurm.job_id()
    if job is None:
        return False
    cause = slurm.sigterm_cause(slurm.show_job(job), slurm.restart_count())
    if cause is None:
        return False
    if REQUEST.reason is None or cause == "requeued":
        REQUEST.reason = f"SIGTERM, the job is {cause}"
        REQUEST.requeue = cause == "preempted"
    log.warning("received SIGTERM: the job is %s; saving a checkpoint at the next batch boundary", cause)
    return True


_HPC = re.compile(r"hpc_ckpt_(\d+)\.ckpt$")


def _remove_older_hpc_checkpoints(newest: Path) -> None:
    number = int(_HPC.search(newest.name).group(1))
    for path in newest.parent.glob("hpc_ckpt_*.ckpt"):
        match = _HPC.search(path.name)
        if match and int(match.group(1)) < number:
            path.unlink(missing_ok=True)


class RequeueCallback(L.Callback):
    """At the end of every training batch: if any rank was asked (warning signal, preemption), every rank saves
    ``hpc_ckpt_<n>.ckpt`` at this step and rank zero requeues the job (see the module docstring).

    Under DDP this costs one ``all_reduce`` of one integer per step. Installed only in a Slurm job.
    """

    def __init__(self) -> None:
        self.start_step = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start_step = trainer.global_step  # the step this attempt resumed at

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        slurm.fit_ended()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        asked = REQUEST.reason is not None
        if trainer.world_size > 1:  # every rank is here in the same step: agree, without touching a handler
            asked = trainer.strategy.reduce_boolean_decision(asked, all=False)
        if asked:
            self._save_and_requeue(trainer)

    def _save_and_requeue(self, trainer: L.Trainer) -> None:
        path = trainer.strategy.broadcast(trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir))
        trainer.save_checkpoint(path)  # every rank: rank zero writes, then a barrier
        outcome = self._requeue(trainer, Path(path)) if trainer.is_global_zero else None
        requeued, message = trainer.strategy.broadcast(outcome)
        REQUEST.reason = None
        if requeued:
            REQUEST.leaving = True
            raise Requeued(message)
        if trainer.is_global_zero:
            sys.stderr.write(f"warning: {message}\n")
            sys.stderr.flush()

    def _requeue(self, trainer: L.Trainer, path: Path) -> tuple[bool, str]:
        """Rank zero, after the checkpoint is written: ``(requeued, the line to print)``."""
        _remove_older_hpc_checkpoints(path)
        step, job = trainer.global_step, slurm.requeue_id()
        reason = REQUEST.reason or "asked on another rank"
        saved = f"saved {path} at step {step}"
        if not REQUEST.requeue:
            return True, f"Slurm job {job} is being requeued ({reason}); {saved}; the requeued job resumes it"
        if reason.startswith("SIGUSR") and step <= self.start_step:
            return False, (
                f"not requeuing Slurm job {job} ({reason}): no step was trained since it started at "
                f"step {self.start_step} (raise the job's time or lower hydra.launcher.signal_delay_s); "
                f"{saved}"
            )
        done, why = slurm.requeue(job)
        if not done:
            return False, (
                f"could not requeue Slurm job {job} ({reason}): scontrol requeue: {why}; {saved} "
                "(resume with ckpt_path=last and the same run_dir); training goes on"
            )
        return True, f"Slurm job {job} requeued ({reason}); {saved}; the requeued job resumes it"


def install(trainer: L.Trainer) -> None:
    """In a Slurm job, add :class:`RequeueCallback` to ``trainer`` (before ``trainer.fit``)."""
    if in_slurm_job():
        trainer.callbacks.append(RequeueCallback())
