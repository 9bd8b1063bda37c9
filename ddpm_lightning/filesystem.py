"""The file system's answers as one line each: permission denied, a read-only file system, no such folder (or a path
under a regular file), no space left.

* :func:`check_writable_folder`: before any work, that a folder (``run_dir``, ``out_dir``, ``hydra.run.dir``...) can be
  created and written, found by trying it: a hidden folder with a one-byte file is created in the nearest existing
  folder (or in the folder itself) and removed again. Trying is the only answer that holds for every user and file
  system (root ignores permission bits, ``/proc`` refuses new folders whatever they say).
* :func:`file_system_error`: an ``OSError`` met while writing as the :class:`~ddpm_lightning.errors.FileSystemError`
  of its kind (exit statuses 4 to 8), one line naming the key, the path, what the file system said and what to do.
* :func:`writing`: a block whose file-system errors become that line.

No Lightning or Hydra import here.
"""

from __future__ import annotations

import contextlib
import errno as E
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ddpm_lightning.errors import (
    FileSystemError,
    NoSpaceError,
    NoSuchFolderError,
    PermissionDeniedError,
    ReadOnlyFileSystemError,
)

_KINDS: dict[int, type[FileSystemError]] = {
    E.EACCES: PermissionDeniedError,
    E.EPERM: PermissionDeniedError,
    E.EROFS: ReadOnlyFileSystemError,
    E.ENOENT: NoSuchFolderError,
    E.ENOTDIR: NoSuchFolderError,
    E.ENOSPC: NoSpaceError,
    E.EDQUOT: NoSpaceError,
}
#: Other errnos that are the file system's answer (exit status 8) even when the error names no file.
_OTHER = {E.EIO, E.EISDIR, E.ENAMETOOLONG, E.ELOOP, E.EFBIG, E.EMLINK, E.EXDEV, E.EEXIST, E.ENOTEMPTY}

_UNSET = object()
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.tmp-\d+-[0-9a-f]{8}$")  # ddpm_lightning.images.atomic_write's temp files
PROBE_PREFIX = ".ddpm-write-check-"  #: the hidden folder :func:`check_writable_folder` creates and removes


def is_file_system_error(err: BaseException) -> bool:
    """An ``OSError`` that is the file system's answer (permission, read-only, missing folder, no space, or any errno
    on a named file), not a network error (``ConnectionError``, a DDP peer gone) or a timeout."""
    if not isinstance(err, OSError) or isinstance(err, (ConnectionError, TimeoutError, BlockingIOError)):
        return False
    return err.errno in _KINDS or err.errno in _OTHER or getattr(err, "filename", None) is not None


def os_error_behind(err: BaseException, depth: int = 5) -> OSError | None:
    """The file system's ``OSError`` that ``err`` is or wraps (its ``__cause__`` / ``__context__``, up to ``depth``
    links; a context hidden with ``raise ... from None`` does not count): torch's checkpoint writer reports a full
    disk as ``RuntimeError: [enforce fail at inline_container.cc] unexpected pos ...`` raised while handling the
    file's ``OSError: [Errno 28] No space left on device``."""
    link: BaseException | None = err
    for _ in range(depth + 1):
        if link is None:
            return None
        if is_file_system_error(link):
            return link  # type: ignore[return-value]
        link = link.__cause__ if link.__cause__ is not None else None if link.__suppress_context__ else link.__context__
    return None


def shown_path(path: Any) -> str | None:
    """``path`` as the user knows it: a hidden temporary file of ``atomic_write`` (``.last.ckpt.tmp-12-abcdef01``) is
    shown as its target (``last.ckpt``)."""
    if path is None:
        return None
    p = Path(os.fsdecode(path) if isinstance(path, bytes) else str(path))
    match = _TEMP_NAME.match(p.name)
    return str(p.with_name(match["name"])) if match else str(p)


def is_under(path: Any, folder: Any) -> bool:
    """Whether ``path`` (an ``OSError``'s filename; None counts as under: a write that names no file) is ``folder`` or
    lies in it, as absolute paths."""
    if path is None:
        return True
    p = os.path.abspath(os.fsdecode(path) if isinstance(path, bytes) else str(path))
    f = os.path.abspath(str(folder))
    return p == f or p.startswith(f.rstrip(os.sep) + os.sep)


def _nearest_existing(path: Path) -> Path | None:
    """The path itself or its nearest ancestor that exists (a folder or a file), None if none can be looked at."""
    p = path
    while True:
        try:
            if os.path.lexists(p):
                return p
        except OSError:  # pragma: no cover - lexists does not raise
            return None
        if p.parent == p:
            return None
        p = p.parent


def _reason(err: OSError, path: Path | None) -> str:
    code = err.errno
    if code in (E.EACCES, E.EPERM):
        return "permission denied"
    if code == E.EROFS:
        return "read-only file system"
    if code == E.ENOSPC:
        return "no space left on the device"
    if code == E.EDQUOT:
        return "disk quota exceeded"
    if code == E.ENOTDIR:
        blocker = _nearest_existing(path) if path is not None else None
        if blocker is not None and not blocker.is_dir():
            return f"{blocker} is a file, not a folder"
        return "a part of the path is a file, not a folder"
    nearest = _nearest_existing(path.parent) if path is not None else None
    if code == E.ENOENT and nearest is not None and nearest.is_dir() and nearest != path.parent:
        return f"no such folder (the nearest one that exists is {nearest})"
    if code == E.ENOENT and nearest is not None and nearest.is_dir():
        return f"no such file or directory ({nearest} does not take new entries)"
    words = os.strerror(code) if code is not None else str(err)
    return words[:1].lower() + words[1:] if words else type(err).__name__


def _advice(err: OSError, key: str | None, path: Path | None, mode: str) -> str:
    to = f"set {key} to a path" if key else "choose a path"
    code = err.errno
    if code in (E.EACCES, E.EPERM):
        nearest = _nearest_existing(path) if path is not None else None
        if nearest is not None and not nearest.is_dir():
            nearest = nearest.parent
        access = f", or get {mode} access to {nearest}" if nearest else ""
        return f"{to} you can {mode}{access}"
    if code == E.EROFS:
        return f"{to} on a writable file system"
    if code == E.ENOTDIR:
        return f"{to} whose parents are folders"
    if code == E.ENOENT:
        return f"{to} in a folder that exists" + (" and that you can write" if mode == "write" else "")
    if code in (E.ENOSPC, E.EDQUOT):
        return f"free space there (or raise the quota), or {to} on another disk"
    return f"check {path}" + (f", or set {key} to another path" if key else "")


def file_system_error(
    err: OSError,
    key: str | None = None,
    value: Any = _UNSET,
    path: Any = None,
    action: str = "write",
    start: bool = False,
    kept: str | None = None,
    then: str | None = None,
    mode: str = "write",
) -> FileSystemError:
    """The one-line :class:`~ddpm_lightning.errors.FileSystemError` of the kind of ``err`` (exit statuses: 4
    permission denied, 5 read-only file system, 6 no such folder or a path under a file, 7 no space left, 8 other).

    Args:
        err: the ``OSError`` (its ``errno`` picks the kind; its ``filename`` is the path when ``path`` is None).
        key: the option the path comes from (``run_dir``, ``out_dir``, ``hydra.run.dir``...), or None.
        value: the option's value as the user set it (default: the path).
        path: the path the operation was on (default ``err.filename``; a temp file of ``atomic_write`` is shown as
            its target).
        action: what was being done, as a verb phrase before the path (``"create"``, ``"write the checkpoint"``).
        start: True for the check before any work: ``<key>=<value> is invalid: cannot <action> <path>: <reason>;
            <what to do>``; False for a failure during the work: ``cannot <action> <path> (<key>=<value>): <reason>;
            <kept>; <what to do>; <then>``.
        kept: what is left as it was (``"the previous last.ckpt is kept as it was"``).
        then: what to do afterwards (``"then resume with ckpt_path=..."``).
        mode: ``"write"`` for an output, ``"read"`` for an input (the advice: a path you can write / read).
    """
    shown = shown_path(path if path is not None else getattr(err, "filename", None))
    p = Path(shown) if shown else None
    value = shown if value is _UNSET else value
    reason, advice = _reason(err, p), _advice(err, key, p, mode)
    where = f" {shown}" if shown else ""
    if start and key:
        text = f"{key}={value!r} is invalid: cannot {action}{where}: {reason}; {advice}"
    else:
        named = f" ({key}={value!r})" if key else ""
        text = f"cannot {action}{where}{named}: {reason}; " + (f"{kept}; " if kept else "") + advice
    if then:
        text += f"; {then}"
    fault = _KINDS.get(err.errno, FileSystemError)(text, err.errno, shown)
    fault.parts = dict(
        err=err, key=key, value=value, path=shown, action=action, start=start, kept=kept, then=then, mode=mode
    )
    return fault


def rekey(
    fault: FileSystemError, key: str, value: Any, kept: str | None = None, then: str | None = None
) -> FileSystemError:
    """``fault`` (from :func:`file_system_error` without a key) under the option ``key`` (and with ``kept`` /
    ``then`` where it had none); unchanged when it already names a key."""
    parts = dict(getattr(fault, "parts", {}))
    if not parts or parts.get("key"):
        return fault
    parts.update(key=key, value=value)
    parts["kept"] = parts.get("kept") or kept
    parts["then"] = parts.get("then") or then
    return file_system_error(**parts)


@contextlib.contextmanager
def writing(
    key: str | None, value: Any = _UNSET, action: str = "write", kept: str | None = None, then: str | None = None
) -> Iterator[None]:
    """Inside the block, an ``OSError`` that is the file system's answer (:func:`is_file_system_error`) becomes the
    one-line :func:`file_system_error` under ``key``, and a keyless :class:`FileSystemError` gets ``key``."""
    try:
        yield
    except FileSystemError as fault:
        raise rekey(fault, key, value, kept, then) if key else fault from None
    except OSError as err:
        if not is_file_system_error(err):
            raise
        raise file_system_error(err, key, value, action=action, kept=kept, then=then) from None


def check_writable_folder(key: str, value: Any, path: Any = None) -> Path:
    """Check, before any work, that the folder ``path`` (default ``value``) can be created (when missing) and written.

    The nearest existing folder (the folder itself when it exists) must be a folder, and a hidden folder with a
    one-byte file (fsynced) is created in it and removed again (:data:`PROBE_PREFIX`): what the file system answers to
    that is what it would answer to the command.

    Args:
        key: the option that names the folder (``run_dir``, ``out_dir``, ``hydra.run.dir``...), for the message.
        value: the option's value as set (quoted in the message).
        path: the folder, when it is not ``value`` itself (a file's folder, a resolved default).

    Returns:
        The folder as an absolute path.

    Raises:
        FileSystemError: ``<key>=<value> is invalid: cannot create <path>: <reason>; <what to do>``, with the exit
            status of its kind (4 permission denied, 5 read-only file system, 6 no such folder or a path under a
            file, 7 no space left, 8 other).
    """
    target = Path(os.path.abspath(Path(str(value if path is None else path)).expanduser()))
    nearest = _nearest_existing(target)
    action = "write in" if nearest == target and target.is_dir() else "create"
    try:
        if nearest is None:
            raise FileNotFoundError(E.ENOENT, os.strerror(E.ENOENT), str(target))
        if not nearest.is_dir():
            raise NotADirectoryError(E.ENOTDIR, os.strerror(E.ENOTDIR), str(target))
        probe = tempfile.mkdtemp(prefix=PROBE_PREFIX, dir=nearest)
        try:
            fd = os.open(os.path.join(probe, "probe"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, b"0")
                os.fsync(fd)
            finally:
                os.close(fd)
        finally:
            shutil.rmtree(probe, ignore_errors=True)
    except OSError as err:
        raise file_system_error(err, key, value, path=target, action=action, start=True) from None
    return target
