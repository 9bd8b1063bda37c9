"""Issue #28: the file system's answers at the boundary. Permission denied, a read-only file system, no such folder (a
path under a regular file, /proc), no space left: one line naming the key, the path and what to do, with the exit
status of its kind (4, 5, 6, 7), from every command, before any work where it can be known; a checkpoint save that
runs out of space keeps the previous last.ckpt and says so.

How each fault is made: a path under a regular file and ``/proc/<x>`` are refused by the kernel for every user. A
chmod 555 folder stops writes only for a user that is not root: where writing into it succeeds anyway (tests run as
root here), ``os.mkdir`` / ``os.open`` under it are made to answer EACCES, as the kernel answers a user. A read-only
file system is made the same way (EROFS); no space left is an ``os.write`` (the writability probe) or a checkpoint
file's ``write`` that answers ENOSPC.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddpm_lightning.config import compose_config, run_command
from ddpm_lightning.errors import (
    FILE_SYSTEM_EXIT_STATUSES,
    FileSystemError,
    NoSpaceError,
    NoSuchFolderError,
    PermissionDeniedError,
    ReadOnlyFileSystemError,
)
from ddpm_lightning.filesystem import PROBE_PREFIX, check_writable_folder, file_system_error

from conftest import TINY_TRAIN, compose_train, run_train_cli

REPO = Path(__file__).resolve().parents[1]


class Refuse:
    """Make ``os.mkdir`` / ``os.open`` (creating or writing) or ``os.write`` refuse every path under ``folder`` with
    ``code``, as the kernel would; only calls on paths under ``folder`` (and on the fds opened there) are touched."""

    def __init__(self, monkeypatch, folder: Path, code: int, on: str = "create") -> None:
        self.folder, self.code = str(folder.resolve()), code
        real_mkdir, real_open, real_write = os.mkdir, os.open, os.write
        fds: set[int] = set()

        def under(path) -> bool:
            p = os.path.abspath(os.fsdecode(path))
            return p == self.folder or p.startswith(self.folder + os.sep)

        def refuse(path):
            raise OSError(code, os.strerror(code), os.fsdecode(path))

        def mkdir(path, *args, **kwargs):
            if on == "create" and under(path):
                refuse(path)
            return real_mkdir(path, *args, **kwargs)

        def open_(path, flags, *args, **kwargs):
            writes = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            if on == "create" and writes and under(path):
                refuse(path)
            fd = real_open(path, flags, *args, **kwargs)
            if on == "write" and writes and under(path):
                fds.add(fd)
            return fd

        def write(fd, data):
            if fd in fds:
                raise OSError(code, os.strerror(code))
            return real_write(fd, data)

        monkeypatch.setattr(os, "mkdir", mkdir)
        monkeypatch.setattr(os, "open", open_)
        monkeypatch.setattr(os, "write", write)


def _writes_despite_chmod(folder: Path) -> bool:
    try:
        (folder / ".x").mkdir()
    except PermissionError:
        return False
    (folder / ".x").rmdir()
    return True


def _read_only_folder(tmp_path, monkeypatch) -> Path:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if _writes_despite_chmod(ro):  # root: the permission bits stop nobody; answer as the kernel answers a user
        Refuse(monkeypatch, ro, errno.EACCES)
    return ro / "run"


def _read_only_file_system(tmp_path, monkeypatch) -> Path:
    mount = tmp_path / "mnt"
    mount.mkdir()
    Refuse(monkeypatch, mount, errno.EROFS)
    return mount / "run"


def _under_a_file(tmp_path, monkeypatch) -> Path:
    (tmp_path / "a_file").write_text("not a folder")
    return tmp_path / "a_file" / "run"


def _proc(tmp_path, monkeypatch) -> Path:
    if not Path("/proc/self").exists():
        pytest.skip("no /proc")
    return Path("/proc/ddpm-lightning-run")


def _full_disk(tmp_path, monkeypatch) -> Path:
    disk = tmp_path / "full"
    disk.mkdir()
    Refuse(monkeypatch, disk, errno.ENOSPC, on="write")
    return disk / "run"


#: (fault, how to make a path it hits, error class, exit status, the reason and the advice in the line; ``{p}`` is the
#: path's parent, ``{key}`` the option).
FAULTS = [
    (
        "read-only folder",
        _read_only_folder,
        PermissionDeniedError,
        4,
        "permission denied",
        "set {key} to a path you can write, or get write access to {p}",
    ),
    (
        "read-only file system",
        _read_only_file_system,
        ReadOnlyFileSystemError,
        5,
        "read-only file system",
        "set {key} to a path on a writable file system",
    ),
    (
        "path under a file",
        _under_a_file,
        NoSuchFolderError,
        6,
        "{p} is a file, not a folder",
        "set {key} to a path whose parents are folders",
    ),
    (
        "/proc",
        _proc,
        NoSuchFolderError,
        6,
        "no such file or directory (/proc does not take new entries)",
        "set {key} to a path in a folder that exists and that you can write",
    ),
    (
        "no space left",
        _full_disk,
        NoSpaceError,
        7,
        "no space left on the device",
        "free space there (or raise the quota), or set {key} to a path on another disk",
    ),
]


def test_each_kind_has_its_own_exit_status_and_the_table_names_them():
    statuses = [PermissionDeniedError, ReadOnlyFileSystemError, NoSuchFolderError, NoSpaceError, FileSystemError]
    assert [c.exit_status for c in statuses] == [4, 5, 6, 7, 8] == list(FILE_SYSTEM_EXIT_STATUSES.values())
    for code, cls in [
        (errno.EACCES, PermissionDeniedError),
        (errno.EPERM, PermissionDeniedError),
        (errno.EROFS, ReadOnlyFileSystemError),
        (errno.ENOENT, NoSuchFolderError),
        (errno.ENOTDIR, NoSuchFolderError),
        (errno.ENOSPC, NoSpaceError),
        (errno.EDQUOT, NoSpaceError),
        (errno.EIO, FileSystemError),
    ]:
        assert type(file_system_error(OSError(code, os.strerror(code), "/x/y"), "out_dir", "/x")) is cls


@pytest.mark.parametrize("fault, make, cls, status, reason, advice", FAULTS, ids=[f[0] for f in FAULTS])
def test_check_writable_folder_says_what_the_file_system_said(
    tmp_path, monkeypatch, fault, make, cls, status, reason, advice
):
    path = make(tmp_path, monkeypatch)
    with pytest.raises(cls) as excinfo:
        check_writable_folder("run_dir", str(path))
    assert excinfo.value.exit_status == status
    assert str(excinfo.value) == (
        f"run_dir='{path}' is invalid: cannot create {path}: {reason}; {advice}".format(p=path.parent, key="run_dir")
    )
    if path.parent.exists() and path.parent.is_dir() and os.access(path.parent, os.R_OK):
        assert not [p for p in path.parent.iterdir() if p.name.startswith(PROBE_PREFIX)]  # the probe is gone
        assert not path.exists()


def test_a_writable_folder_passes_and_nothing_is_left_behind(tmp_path):
    assert check_writable_folder("out_dir", str(tmp_path / "a" / "b")) == tmp_path / "a" / "b"
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "c").mkdir()
    check_writable_folder("out_dir", str(tmp_path / "c"))
    assert list((tmp_path / "c").iterdir()) == []


def _boundary(fn, cfg, capsys) -> tuple[int, str]:
    """``run_command(fn, cfg)``: its exit status and its stderr, which must be one line."""
    with pytest.raises(SystemExit) as exited:
        run_command(fn, cfg)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return exited.value.code, err.strip()


def _sweep(tmp_path: Path) -> Path:
    job = tmp_path / "sweep" / "0" / ".hydra"
    job.mkdir(parents=True)
    (job / "overrides.yaml").write_text("[]\n")
    return tmp_path / "sweep"


def _train(fake, path):
    from ddpm_lightning.training import train

    return train, compose_train([*TINY_TRAIN, f"data.root={fake}", f"run_dir={path}"]), "run_dir", str(path)


def _sample(fake, path):
    from ddpm_lightning.cli.sample import sample

    return sample, compose_config("sample", ["ckpt_path=x.ckpt", f"out_dir={path}"]), "out_dir", str(path)


def _evaluate(fake, path):
    from ddpm_lightning.cli.evaluate import run

    cfg = compose_config("evaluate", ["samples=real", f"data.root={fake}", f"out_dir={path}"])
    return run, cfg, "out_dir", str(path)


def _train_classifier(fake, path):
    from ddpm_lightning.cli.train_classifier import run

    out = path / "clf.pt"
    return run, compose_config("train_classifier", [f"data.root={fake}", f"out={out}"]), "out", str(out)


def _report(fake, path):
    from ddpm_lightning.cli.report import parse_args, run

    return run, parse_args([str(_sweep(fake.parent)), "--out", str(path)]), "--out", str(path)


COMMANDS = {
    "ddpm-train": _train,
    "ddpm-sample": _sample,
    "ddpm-evaluate": _evaluate,
    "ddpm-train-classifier": _train_classifier,
    "ddpm-report": _report,
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("fault, make, cls, status, reason, advice", FAULTS, ids=[f[0] for f in FAULTS])
def test_every_command_answers_each_fault_in_one_line_with_its_status(
    fake_mnist_root, tmp_path, monkeypatch, capsys, command, fault, make, cls, status, reason, advice
):
    """Before any work: the key and the path in one line on stderr, the kind's exit status, nothing written."""
    path = make(tmp_path, monkeypatch)
    fn, cfg, key, value = COMMANDS[command](fake_mnist_root, path)
    code, line = _boundary(fn, cfg, capsys)
    assert code == status, line
    assert line == (
        f"error: {key}={value!r} is invalid: cannot create {path}: {reason}; {advice}".format(p=path.parent, key=key)
    )
    assert not path.exists()


# ------------------------------------------------------------------------------------------- the real command lines
def _cli(module: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", f"ddpm_lightning.cli.{module}", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_the_commands_end_in_one_line_before_hydra_writes_anything(fake_mnist_root, tmp_path):
    """The issue's ``ddpm-train run_dir=/proc/x`` and its kin, through the real entry points: one ``error:`` line and
    exit 6, no Hydra "Error executing job" traceback, and no Hydra run folder (outputs/) created."""
    afile = tmp_path / "a_file"
    afile.write_text("x")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc_path = "/proc/ddpm-lightning-x"
    cases = [
        (
            "train",
            ["run_dir=/proc/x"],
            "run_dir='/proc/x' is invalid: cannot create /proc/x: no such file or directory "
            "(/proc does not take new entries); set run_dir to a path in a folder that "
            "exists and that you can write",
        ),
        (
            "train",
            [f"run_dir={afile}/run"],
            f"run_dir='{afile}/run' is invalid: cannot create {afile}/run: {afile} is "
            "a file, not a folder; set run_dir to a path whose parents are folders",
        ),
        ("train", [f"hydra.run.dir={afile}/h"], f"hydra.run.dir='{afile}/h' is invalid: cannot create {afile}/h: "),
        ("train", ["-m", f"hydra.sweep.dir={afile}/s", "seed=1,2"], f"hydra.sweep.dir='{afile}/s' is invalid: "),
        ("sample", ["ckpt_path=x.ckpt", f"out_dir={proc_path}"], f"out_dir='{proc_path}' is invalid: cannot create "),
        ("evaluate", ["samples=real", f"out_dir={afile}/e"], f"out_dir='{afile}/e' is invalid: cannot create "),
        (
            "train_classifier",
            [f"data.root={fake_mnist_root}", f"out={afile}/clf.pt"],
            f"out='{afile}/clf.pt' is invalid: cannot create {afile}: ",
        ),
    ]
    for module, args, start in cases:
        proc = _cli(module, args, cwd)
        assert proc.returncode == 6, (args, proc.stderr[-2000:])
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"error: {start}"), (args, proc.stderr)
        assert "Error executing job" not in proc.stderr and not list(cwd.iterdir()), args
    sweep = _sweep(tmp_path)
    proc = _cli("report", [str(sweep), "--out", f"{afile}/r"], cwd)
    assert proc.returncode == 6 and proc.stderr == (
        f"error: --out='{afile}/r' is invalid: cannot create {afile}/r: "
        f"{afile} is a file, not a folder; set --out to a path whose "
        "parents are folders\n"
    ), proc.stderr


@pytest.mark.slow
def test_a_folder_the_user_may_not_write_exits_4_through_the_real_command(tmp_path):
    """A real refusal of permission, no patching: a chmod 555 folder for a user, ``/sys`` (EPERM) for root."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    target = ro / "run"
    if _writes_despite_chmod(ro):
        try:
            os.mkdir("/sys/ddpm-lightning-x")
        except PermissionError:
            target = Path("/sys/ddpm-lightning-x")
        except OSError:  # pragma: no cover - no /sys
            pytest.skip("no folder here refuses root")
        else:  # pragma: no cover - a writable /sys
            os.rmdir("/sys/ddpm-lightning-x")
            pytest.skip("no folder here refuses root")
    proc = run_train_cli([f"run_dir={target}"], cwd=tmp_path, timeout=120)
    ro.chmod(0o755)
    assert proc.returncode == 4, proc.stderr
    assert proc.stderr.strip().startswith(
        f"error: run_dir='{target}' is invalid: cannot create {target}: permission "
        f"denied; set run_dir to a path you can write, or get write access to "
    )


# ------------------------------------------------------------------------------- a full disk at a checkpoint save
class _FullAfter:
    """A file object whose writes fail with ENOSPC once ``budget`` bytes are written (a disk filling up)."""

    def __init__(self, f, budget: int) -> None:
        self._f, self._left = f, budget

    def write(self, data) -> int:
        n = len(memoryview(data).cast("B"))
        if n > self._left:
            self._f.write(bytes(memoryview(data).cast("B")[: self._left]))
            self._left = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._left -= n
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def _quiet_log_handlers(monkeypatch) -> None:
    """Lightning's log handlers write to the stderr of the test that first imported it (closed by now): send them
    elsewhere, so that stderr holds only what the boundary prints."""
    import io
    import logging

    loggers = [logging.getLogger()] + [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                monkeypatch.setattr(handler, "stream", io.StringIO())


@pytest.mark.slow
def test_a_save_that_runs_out_of_space_keeps_the_previous_checkpoint_and_says_how_to_resume(
    tiny_train_overrides, monkeypatch, capsys
):
    """Two epochs; the second save of last.ckpt runs out of space half-way (ENOSPC from the file's write). The run
    ends in one line (exit 7) saying that the previous last.ckpt is kept, which it is, byte for byte; the resume that
    the line suggests then finishes the run."""
    import ddpm_lightning.checkpoint as checkpoint_module
    from ddpm_lightning.training import train

    cfg = compose_train([*tiny_train_overrides, "trainer.max_epochs=2"])
    last = Path(str(cfg.run_dir)) / "checkpoints" / "last.ckpt"
    kept: dict[str, bytes] = {}
    real_open = open

    def open_(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if "w" in mode and Path(path).name.startswith(".last.ckpt.tmp-") and last.is_file():
            kept["bytes"] = last.read_bytes()
            return _FullAfter(f, 1000)
        return f

    monkeypatch.setattr(checkpoint_module, "open", open_, raising=False)
    _quiet_log_handlers(monkeypatch)
    code, line = _boundary(train, cfg, capsys)
    assert code == 7
    assert line == (
        f"error: cannot write the checkpoint {last} (run_dir='{cfg.run_dir}'): no space left on the "
        f"device; the previous last.ckpt is kept as it was; free space there (or raise the quota), or set "
        f"run_dir to a path on another disk; then resume with ckpt_path={last}"
    )
    assert last.read_bytes() == kept["bytes"]
    assert sorted(p.name for p in last.parent.iterdir() if p.name.startswith(".")) == []  # no temp file left
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == 0
    monkeypatch.undo()
    resumed = train(compose_train([*tiny_train_overrides, "trainer.max_epochs=2", line.rsplit(" ", 1)[1]]))
    assert resumed["trainer"].current_epoch == 2


def test_the_first_save_that_runs_out_of_space_says_no_checkpoint_existed(tmp_path, monkeypatch):
    from ddpm_lightning.checkpoint import AtomicCheckpointIO

    target = tmp_path / "last.ckpt"
    monkeypatch.setattr(torch, "save", lambda obj, f: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space")))
    with pytest.raises(NoSpaceError) as excinfo:
        AtomicCheckpointIO().save_checkpoint({"state_dict": {}}, target)
    assert str(excinfo.value) == (
        f"cannot write the checkpoint {target}: no space left on the device; no last.ckpt "
        "existed before; free space there (or raise the quota), or choose a path on another "
        "disk"
    )
    assert list(tmp_path.iterdir()) == []


def test_an_os_error_no_part_has_named_is_named_at_the_boundary(tmp_path, capsys):
    """The boundary's catch-all: an OSError of the file system from anywhere names the option whose path holds the
    file (here out_dir), with the kind's status; other OSErrors (a lost connection) still propagate."""
    cfg = compose_config("sample", ["ckpt_path=x.ckpt", f"out_dir={tmp_path / 'out'}"])

    def fails(_cfg):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / "out" / ".grid.png.tmp-1-0123abcd"))

    code, line = _boundary(fails, cfg, capsys)
    assert code == 5
    assert line == (
        f"error: cannot write {tmp_path / 'out' / 'grid.png'} (out_dir='{tmp_path / 'out'}'): read-only "
        "file system; set out_dir to a path on a writable file system"
    )

    def lost(_cfg):
        raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")

    with pytest.raises(ConnectionResetError):
        run_command(lost, cfg)


def test_torchs_wrapped_os_error_and_a_refused_read_are_named_at_the_boundary(fake_mnist_root, tmp_path, capsys):
    """torch's writer reports a full disk as a RuntimeError raised while handling the file's OSError (no file name):
    the line names the output option's folder; a refused read names the input option (data.root), not an output."""
    out = tmp_path / "out"
    cfg = compose_config("evaluate", ["samples=real", f"data.root={fake_mnist_root}", f"out_dir={out}"])

    def like_torch_save(_cfg):
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None

    def like_torch_save_chained(_cfg):
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # noqa: B904

    with pytest.raises(RuntimeError):  # `from None` hides the cause: nothing to name, the error passes unchanged
        run_command(like_torch_save, cfg)
    code, line = _boundary(like_torch_save_chained, cfg, capsys)
    assert code == 7
    assert line == (
        f"error: cannot write in {out} (out_dir='{out}'): no space left on the device; free space there "
        "(or raise the quota), or set out_dir to a path on another disk"
    )
    images = fake_mnist_root / "MNIST" / "raw" / "train-images-idx3-ubyte"

    def refused_read(_cfg):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(images))

    code, line = _boundary(refused_read, cfg, capsys)
    assert code == 4
    assert line == (
        f"error: cannot read {images} (data.root='{fake_mnist_root}'): permission denied; set data.root to "
        f"a path you can read, or get read access to {images.parent}"
    )
