"""One writer per run directory: an exclusive OS lock (``fcntl.flock``) on ``<run_dir>/.ddpm-train.lock``.

The lock belongs to the process: the operating system releases it when the process exits, however it exits (a crash
or SIGKILL included), so a stale lock file never blocks a requeued job. The file's text says who holds it (pid, host,
start time, Slurm job id), for the one-line refusal a second process gets and for a requeued Slurm job to know its
own run directory (:func:`last_holder`). No Lightning or Hydra import here.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import IO

from ddpm_lightning.errors import invalid

LOCK_FILE = ".ddpm-train.lock"


class RunDirLock:
    """Hold the exclusive lock on ``run_dir`` from :meth:`acquire` until :meth:`release` or the end of the process.

    Raises:
        ConfigError (from :meth:`acquire`): another process holds the lock: ``run_dir='X' is invalid: another
            ddpm-train is writing it (pid 123 on host h, started 2026-12-01T09:00:00+00:00); ...``.
    """

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._file: IO[str] | None = None

    def acquire(self) -> RunDirLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip()
            f.close()
            raise invalid(
                "run_dir",
                str(self.run_dir),
                f"another ddpm-train is writing it ({_describe(holder)}); wait for "
                "it to end (ckpt_path=last then resumes its checkpoint), or choose another run_dir",
            ) from None
        f.seek(0)
        f.truncate()
        f.write(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                }
            )
            + "\n"
        )
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def last_holder(run_dir: str | os.PathLike[str]) -> dict:
    """What the lock file of ``run_dir`` says about the process that held it last (``pid``, ``host``, ``started``,
    ``slurm_job_id``: its Slurm job, or None); empty when there is no readable lock file."""
    try:
        info = json.loads((Path(run_dir) / LOCK_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _describe(text: str) -> str:
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on host {info['host']}, started {info['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"
