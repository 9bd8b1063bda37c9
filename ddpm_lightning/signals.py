"""SIGTERM that ends every DDP rank within seconds, whatever a rank is doing when it arrives.

SLURM sends SIGTERM at the time limit, at preemption and on ``scancel``. Lightning 2.6's handler
(``_SignalConnector._sigterm_notifier_fn``) calls ``torch.distributed.broadcast`` from inside the signal handler:
a rank that receives the signal while the other ranks are elsewhere (rank zero drawing the epoch-end grid while the
others wait in the checkpoint barrier) starts a collective that nobody joins, and every rank waits forever.

:class:`SafeSignalConnector` replaces that handler with one that touches no collective: it forwards the signal to
the local DDP child processes (as Lightning's does) and raises :class:`SIGTERMException` in this rank at once. Each
rank gets the signal (from SLURM, or forwarded by rank zero) and leaves; a rank still inside a collective with a
rank that has left gets an error from the process group and leaves too. Checkpoints are written atomically
(:class:`~ddpm_lightning.checkpoint.AtomicCheckpointIO`), so the newest complete ``last.ckpt`` stays as it was.

A DDP child that dies (OOM killer, SIGKILL) is noticed by Lightning's child-process observer in rank zero, which
polls every 5 seconds and then SIGKILLs the children and rank zero itself: rank zero would end with status -9 and
no word, unless its own collective failed first. :class:`PeerWatch` does the same clean-up but first prints the
one-line ``error:`` and ends rank zero with status 1, whichever notices first. After a SIGTERM the children ending
is expected, not a peer failure: PeerWatch then gives rank zero's own exit (its ``stopped by SIGTERM`` line and
143) :attr:`PeerWatch.grace_s` seconds before it ends rank zero with that status itself.

Slurm: one signal plan (details and the code in :mod:`ddpm_lightning.requeue`, measured in tests/test_slurm.py):

* Before the time limit Slurm sends the warning signal of ``#SBATCH --signal``: SIGUSR2 under
  ``hydra/launcher=slurm`` (submitit's ``--signal=USR2@<signal_delay_s>``), SIGUSR1 in a script written for
  Lightning. In a Slurm job both only set a flag (they replace Lightning's SIGUSR1 handler, which saves and requeues
  inside the handler, and submitit's SIGUSR2 handler, which requeues without saving, while ``trainer.fit`` runs).
* SIGTERM: :class:`SafeSignalConnector` first asks :func:`ddpm_lightning.requeue.defer_sigterm`. A *preempted* job
  (Slurm's ``PreemptTime`` is set; the partition's ``GraceTime`` runs) or one being requeued (``scontrol requeue``)
  sets the same flag and carries on; ``scancel``, the time limit itself and any SIGTERM outside Slurm end the rank
  at once as above (one line, exit 143, the newest checkpoint named).
* Who saves: every rank, at the next training-batch boundary, where one ``all_reduce`` per step lets the ranks agree
  on the same step (:class:`~ddpm_lightning.requeue.RequeueCallback`); no collective runs inside a handler.
* Who requeues: ``ddpm-train``'s rank zero, once, with ``scontrol requeue`` after the checkpoint is written (not
  submitit's handler, not Lightning's); every rank then ends with ``requeued: ...`` and exit status 75. The
  requeued job resumes with ``ckpt_path=last`` in the same run directory.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from types import FrameType
from typing import Any

from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver
from lightning.pytorch.strategies.launchers import subprocess_script
from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ddpm_lightning import requeue
from ddpm_lightning.errors import print_error

log = logging.getLogger(__name__)

#: Set by :class:`SafeSignalConnector` when this process receives SIGTERM (read by :class:`PeerWatch`).
SIGTERM_RECEIVED = threading.Event()

#: The one line of a SIGTERM stop (the same start as training's StoppedBySignal, which adds the checkpoint).
STOPPED = "stopped by SIGTERM; the newest complete checkpoint is kept"


class SafeSignalConnector(_SignalConnector):
    """Lightning's signal connector with a SIGTERM handler that is safe in the middle of a collective, and in a
    Slurm job the requeue plan's handlers (:mod:`ddpm_lightning.requeue`)."""

    def register_signal_handlers(self) -> None:
        super().register_signal_handlers()
        requeue.register(self._register_signal)  # Slurm: SIGUSR1/SIGUSR2 only set a flag

    def _sigterm_notifier_fn(self, signum: Any, _: FrameType | None) -> None:
        if requeue.defer_sigterm():  # Slurm preempts or requeues this job: save at the next batch boundary
            return
        rank = getattr(self.trainer, "global_rank", 0)
        log.warning("rank %s: received SIGTERM (%s), stopping now", rank, signum)
        if not self.received_sigterm:
            launcher = self.trainer.strategy.launcher
            if launcher is not None:
                launcher.kill(signum)  # the local DDP children (a no-op where there are none)
        self.received_sigterm = True
        SIGTERM_RECEIVED.set()
        raise SIGTERMException()


#: The one line rank zero prints when a DDP peer has gone (the same as training's PeerRankFailed).
PEER_GONE = "this DDP rank stops because another rank ended ({why}); that rank's own message says why"


class PeerWatch(_ChildProcessObserver):
    """Lightning's child-process observer, ending rank zero with the one-line error and exit status 1 (after
    killing the other local ranks, as Lightning does) instead of SIGKILLing it silently."""

    #: After a SIGTERM, seconds rank zero gets to end by itself once a child has ended (this thread is a daemon,
    #: so it goes with the process); then PeerWatch ends it with :data:`STOPPED` and 143.
    grace_s: float = 60.0

    def _terminate_all(self) -> None:
        stopping = SIGTERM_RECEIVED.is_set()  # the children end because this rank forwarded the SIGTERM
        if stopping:
            time.sleep(self.grace_s)
        for p in self._child_processes:
            p.send_signal(self._termination_signal)
        if stopping:
            print_error(f"{STOPPED} (this rank did not end within {self.grace_s:g} s of its DDP children)")
            os._exit(143)
        codes = ", ".join(str(p.returncode) for p in self._child_processes if p.returncode)
        print_error(PEER_GONE.format(why=f"a local DDP child exited with status {codes}"))
        os._exit(1)


def _launch_peer_watch(child_processes: list[Any]) -> None:
    PeerWatch(child_processes=child_processes, main_pid=os.getpid()).start()


def install(trainer: Any) -> None:
    """Give ``trainer`` the :class:`SafeSignalConnector` (before ``trainer.fit``, which registers its handlers), in a
    Slurm job the :class:`~ddpm_lightning.requeue.RequeueCallback`, and make Lightning's DDP launcher watch its
    children with :class:`PeerWatch`."""
    trainer._signal_connector = SafeSignalConnector(trainer)
    requeue.install(trainer)
    subprocess_script._launch_process_observer = _launch_peer_watch


# ---------------------------------------------------------------------------------------------- NCCL (issue 26)
#: Seconds between a SIGTERM and the abort of an NCCL process group (:func:`abort_on_sigterm`): a rank running Python
#: code leaves through its own handler well within this; a rank blocked in NCCL or a CUDA sync is freed by the abort.
ABORT_GRACE_S = 2.0
_abort_watch: tuple[Any, Any] | None = None  # the wakeup socket pair, kept open for the life of the process


def abort_on_sigterm(grace_s: float = ABORT_GRACE_S) -> bool:
    """On SIGTERM, abort this process's NCCL process group (``torch.distributed``'s ``_abort_process_group``) after
    ``grace_s`` seconds, from a watcher thread, so that a rank blocked in an NCCL collective or in a CUDA sync (where
    no Python signal handler can run) errors out, and its peers' collectives with it, instead of waiting for the
    process-group timeout (``trainer.strategy.timeout_min``).

    The signal reaches the thread through :func:`signal.set_wakeup_fd` (written by the C-level handler, whatever the
    main thread is doing). Gloo groups are left alone (a gloo rank runs its handler and leaves; measured in
    tests/test_ddp.py). Call from the main thread, once per process; returns False (and does nothing) elsewhere or
    when another wakeup fd is set.
    """
    global _abort_watch
    import signal
    import socket

    if _abort_watch is not None or threading.current_thread() is not threading.main_thread():
        return False
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    if signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False) != -1:  # someone else's: put it back
        signal.set_wakeup_fd(-1)
        reader.close()
        writer.close()
        return False

    def watch() -> None:
        while True:
            data = reader.recv(64)
            if not data:
                return
            if signal.SIGTERM in data:
                time.sleep(grace_s)
                _abort_nccl()

    _abort_watch = (reader, writer)
    threading.Thread(target=watch, name="ddpm-abort-on-sigterm", daemon=True).start()
    return True


def _abort_nccl() -> None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_backend() != "nccl":
        return
    log.warning("SIGTERM: aborting the NCCL process group so that no rank waits in a collective")
    try:
        dist.distributed_c10d._abort_process_group()
    except Exception as err:
        log.warning("could not abort the process group: %s", err)


def skip_sigterm_broadcast(trainer: Any) -> None:
    """Lightning 2.6 broadcasts rank zero's "SIGTERM received" flag before every training batch under DDP: a tensor
    copied to the device, a broadcast and an ``.item()``, a host sync per step. With :class:`SafeSignalConnector`
    every rank leaves on its own SIGTERM (from SLURM or torchrun, or forwarded by rank zero to the ranks it
    launched), so the broadcast is not needed; this turns it off for ``trainer``."""
    loop = trainer.fit_loop.epoch_loop
    if hasattr(loop, "_broadcast_sigterm_tensor"):
        loop._broadcast_sigterm_tensor = lambda: None
