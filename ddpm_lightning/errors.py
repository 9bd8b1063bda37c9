"""The project's user-facing error: one line that names the key, the value and what is allowed."""

from __future__ import annotations

import sys

_UNSET = object()


class ProjectError(Exception):
    """An error the user can act on: the commands print its one-line message (no traceback) and exit with
    :attr:`exit_status` (see :func:`ddpm_lightning.config.run_command`)."""

    exit_status = 1
    #: The word the one line starts with (``error: ...``; a job that requeued itself prints ``requeued: ...``).
    label = "error"


class ConfigError(ProjectError, ValueError):
    """A bad configuration value, raised before any work starts.

    The message is one line, e.g. ``beta_end=1.5 is invalid: must be in (0, 1)``. A component names its own
    parameter (``key``); :func:`ddpm_lightning.config.build` and :func:`ddpm_lightning.config.at_key` prefix the key
    path of its config node (``schedule.beta_end=1.5 is invalid: ...``), and the one command wrapper
    (:func:`ddpm_lightning.config.run_command`) prints it without a traceback and exits with status 2.

    Attributes:
        key: the parameter the message starts with (``"beta_end"``), or None for a message about no single key.
    """

    exit_status = 2

    def __init__(self, message: str, key: str | None = None, value: object = _UNSET, allowed: str | None = None):
        super().__init__(message)
        self.key, self.value, self.allowed = key, value, allowed

    def at(self, prefix: str | None) -> ConfigError:
        """The same error under the config node ``prefix``: ``eta=-1 ...`` -> ``callbacks.fid.sampler.eta=-1 ...``.
        A message about no single key gets ``<prefix>: `` in front. ``prefix`` None or empty: unchanged."""
        if not prefix:
            return self
        if self.key is not None and self.value is not _UNSET:
            return invalid(f"{prefix}.{self.key}", self.value, self.allowed or "")
        if self.key is not None and str(self).startswith(self.key):
            return ConfigError(f"{prefix}.{self}", key=f"{prefix}.{self.key}")
        return ConfigError(f"{prefix}: {self}")


def invalid(key: str, value: object, allowed: str) -> ConfigError:
    """Build the standard message ``<key>=<value> is invalid: <allowed>`` (the value as its ``repr``)."""
    return ConfigError(f"{key}={value!r} is invalid: {allowed}", key=key, value=value, allowed=allowed)


class MNISTDataError(ProjectError, RuntimeError):
    """The MNIST raw files are missing, truncated or corrupt (one line naming the file and the ``data.root`` hint);
    exit status 2."""

    exit_status = 2


class NonFiniteError(ProjectError, RuntimeError):
    """Training produced NaN or infinite numbers; entry points print the one-line message and exit with status 3.
    Raised before anything non-finite is saved, so the newest checkpoint is the last good one."""

    exit_status = 3


class StoppedBySignal(ProjectError):
    """SIGTERM ended training (a preempted job); the message says which checkpoint to resume from. Exit 143."""

    exit_status = 143


class PeerRankFailed(ProjectError):
    """Under DDP, another rank has gone (its own message says why); this rank ends with one line. Exit 1."""

    exit_status = 1


class NonFiniteLossError(NonFiniteError):
    """A NaN or infinite loss; raised before the optimizer step, so no checkpoint holds the corrupted weights. The
    message names the global step, the loss and the learning rate."""


class NonFiniteWeightsError(NonFiniteError):
    """A NaN or infinite parameter or optimizer state right after an optimizer step (a finite loss can still give
    non-finite weights, e.g. with a huge learning rate), or in a checkpoint about to be written. The message names
    the global step and the first bad tensor."""


class FileSystemError(ProjectError):
    """The operating system refused to create, write or read a path (:mod:`ddpm_lightning.filesystem` builds it from
    an ``OSError``): one line naming the key (``run_dir``, ``out_dir``, ``hydra.run.dir``...), the path, what the file
    system said and what to do. Each answer has its own exit status (:data:`FILE_SYSTEM_EXIT_STATUSES`): 4 permission
    denied, 5 read-only file system, 6 no such folder (a missing parent, or a path under a regular file), 7 no space
    left (or disk quota exceeded), 8 any other refusal of the file system.

    Attributes:
        errno: the ``OSError``'s errno (``errno.ENOSPC``...), or None.
        path: the path the operation was on.
    """

    exit_status = 8

    def __init__(self, message: str, errno: int | None = None, path: str | None = None) -> None:
        super().__init__(message)
        self.errno, self.path = errno, path


class PermissionDeniedError(FileSystemError):
    """``EACCES`` / ``EPERM``: the user may not write there. Exit 4."""

    exit_status = 4


class ReadOnlyFileSystemError(FileSystemError):
    """``EROFS``: the path is on a file system mounted read-only. Exit 5."""

    exit_status = 5


class NoSuchFolderError(FileSystemError):
    """``ENOENT`` / ``ENOTDIR``: a parent folder is missing or cannot hold folders, or a part of the path is a regular
    file. Exit 6."""

    exit_status = 6


class NoSpaceError(FileSystemError):
    """``ENOSPC`` / ``EDQUOT``: no space left on the device, or the user's disk quota is used up. Exit 7. A checkpoint
    that fails to save this way leaves the previous one as it was (the write goes to a temporary file first)."""

    exit_status = 7


#: The exit status of each kind of file-system refusal (the README's table; ``ddpm-* --help`` docstrings).
FILE_SYSTEM_EXIT_STATUSES = {
    "permission denied": PermissionDeniedError.exit_status,
    "read-only file system": ReadOnlyFileSystemError.exit_status,
    "no such folder, or a path under a file": NoSuchFolderError.exit_status,
    "no space left on the device (or disk quota exceeded)": NoSpaceError.exit_status,
    "any other refusal of the file system": FileSystemError.exit_status,
}


def check_int(key: str, value: object, low: int, allowed: str | None = None, nullable: bool = False) -> None:
    """``value`` must be an integer >= ``low`` (or None when ``nullable``); else the one-line
    ``<key>=<value> is invalid: <allowed>`` (default ``must be an integer >= <low>``)."""
    if value is None and nullable:
        return
    if not is_int(value) or value < low:
        raise invalid(key, value, allowed or f"must be an integer >= {low}" + (" or null" if nullable else ""))


def check_bool(key: str, value: object, allowed: str = "must be true or false") -> bool:
    """``value`` must be a bool (not 1, not "yes"); else the one-line ``<key>=<value> is invalid: <allowed>``."""
    if not isinstance(value, bool):
        raise invalid(key, value, allowed)
    return value


def print_error(message: object) -> None:
    """``error: <message>`` on stderr as ONE write (a line under the pipe's atomic size): the ranks of a DDP run
    share one stderr, and ``print`` writes the text and the newline separately, so two ranks' lines could merge.
    A :class:`ProjectError` starts with its own :attr:`~ProjectError.label` instead of ``error``."""
    sys.stderr.write(f"{getattr(message, 'label', 'error')}: {message}\n")
    sys.stderr.flush()


def first_line(err: BaseException, limit: int = 300) -> str:
    """``ClassName: first line of the message`` (shortened to ``limit`` characters), for one-line errors."""
    lines = str(err).strip().splitlines()
    text = lines[0].strip() if lines else ""
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def is_int(value: object) -> bool:
    """An ``int`` that is not a ``bool`` (``True`` and ``1e3`` are not accepted as counts)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """An ``int`` or ``float`` that is not a ``bool``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
