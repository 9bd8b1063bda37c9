"""Load a checkpoint written by ``ddpm-train`` back into a :class:`~ddpm_lightning.module.DDPM`, without the
original config files.

A ``ddpm-train`` checkpoint is self-describing: ``hyper_parameters["config"]`` holds the full resolved Hydra config
as plain containers, so the ``model``, ``schedule`` and ``sampler`` nodes can be instantiated again and the
``state_dict`` loaded into them. Files are read with ``torch.load(weights_only=True)``: a checkpoint that needs
arbitrary unpickling (custom classes) is refused rather than executed.

EMA weights: a run with the EMA callback (Lightning's ``WeightAveraging`` format) stores the averaged weights
in ``state_dict`` and the raw weights in ``current_model_state``. ``use_ema=True`` loads the average,
``use_ema=False`` the raw weights; a checkpoint without EMA has only raw weights (a warning when EMA was asked for).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ddpm_lightning.config import build
from ddpm_lightning.errors import ConfigError, NonFiniteWeightsError, first_line, invalid
from ddpm_lightning.filesystem import file_system_error, os_error_behind
from ddpm_lightning.hparams import flatten
from ddpm_lightning.images import atomic_write
from ddpm_lightning.module import DDPM, first_non_finite

log = logging.getLogger(__name__)

RAW_KEY = "current_model_state"  #: Lightning's WeightAveraging keeps the raw weights here; state_dict is the EMA


def checkpoint_file(path: str | os.PathLike[str]) -> Path:
    """``path`` (``~`` expanded) when it is an existing file.

    Raises:
        ConfigError: ``ckpt_path=<path> is invalid: no such checkpoint file``.
    """
    p = Path(os.fspath(path)).expanduser()
    if not p.is_file():
        raise invalid("ckpt_path", str(path), "no such checkpoint file")
    return p


def load_checkpoint(path: str | os.PathLike[str], mmap: bool = False) -> dict[str, Any]:
    """Read a ``ddpm-train`` checkpoint onto the CPU with ``torch.load(weights_only=True)``.

    ``mmap=True`` maps the tensors instead of reading them (cheap for a look at the stored config of a 1 GB file).

    Returns:
        The checkpoint dict (``state_dict``, ``hyper_parameters`` with ``config``/``seed``/``image_shape``, ...).

    Raises:
        ConfigError: one line naming ``ckpt_path`` when the file does not exist, cannot be read as a
            weights-only checkpoint (truncated, garbage, or pickled custom objects), or was not written by
            ``ddpm-train`` (no ``hyper_parameters.config``).
    """
    p = checkpoint_file(path)
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # UnpicklingError, RuntimeError (bad zip), EOFError, ... : all mean "unreadable"
        why = f"not a readable checkpoint (torch.load weights_only=True failed: {first_line(err)})"
        raise invalid("ckpt_path", str(path), why) from None
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, Mapping) else None
    config = hp.get("config") if isinstance(hp, Mapping) else None
    if not isinstance(config, Mapping) or not all(isinstance(config.get(k), Mapping) for k in ("model", "schedule")):
        raise invalid(
            "ckpt_path",
            str(path),
            "not written by ddpm-train (no hyper_parameters.config with model and schedule nodes)",
        )
    return ckpt


#: Keys added after the first checkpoints were written, with the value that a checkpoint without them was trained with.
ADDED_KEYS = {
    "model.compile": False,
    "diffusion.objective": "eps",
    "schedule.rescale_zero_terminal_snr": False,
    "schedule.sigmoid_start": -3.0,
    "schedule.sigmoid_end": 3.0,
    "schedule.sigmoid_tau": 1.0,
}

#: What a resumed run must share with its checkpoint: the network, the schedule and what the network predicts.
RESUME_KEYS = ("model", "schedule", "diffusion.objective")
#: Keys inside RESUME_KEYS that may differ on resume: how the network runs, not what it is.
RESUME_FREE_KEYS = ("model.compile",)


def stored_value(config: Mapping[str, Any], key: str) -> Any:
    """The dotted ``key`` of a stored config, or its :data:`ADDED_KEYS` value when the checkpoint predates it."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return ADDED_KEYS.get(key)
        node = node[part]
    return node


def resume_mismatch(
    stored: Mapping[str, Any], config: Mapping[str, Any], groups: tuple[str, ...] = RESUME_KEYS
) -> str | None:
    """Say how the network, schedule or objective of a checkpoint's stored config differs from the config of a resumed
    run. A key the checkpoint predates (:data:`ADDED_KEYS`) counts as its old implicit value.

    Args:
        stored: the checkpoint's ``hyper_parameters["config"]``.
        config: the new run's resolved config as plain containers.
        groups: config groups or dotted leaves to compare.

    Returns:
        None when every leaf of ``groups`` is equal, else e.g.
        ``"schedule.beta_end=0.02 in the checkpoint, 0.1 in the config"`` (up to three differences).
    """
    diffs = []
    for group in groups:
        old, new = (flatten({group: stored_value(c, group)}) for c in (stored, config))
        for key, value in ADDED_KEYS.items():
            if key.startswith(group + ".") or key == group:
                old.setdefault(key, value)
                new.setdefault(key, value)
        for key in sorted(set(old) | set(new)):
            if key in RESUME_FREE_KEYS:
                continue
            if old.get(key, "<unset>") != new.get(key, "<unset>"):
                diffs.append(
                    f"{key}={old.get(key, '<unset>')!r} in the checkpoint, {new.get(key, '<unset>')!r} in the config"
                )
    if not diffs:
        return None
    more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
    return "; ".join(diffs[:3]) + more


def _instantiate(node: Mapping[str, Any], key: str) -> Any:
    """Instantiate a stored config node; the project's one-line errors pass through unwrapped."""
    try:
        return build(dict(node))
    except InstantiationException as err:
        raise ConfigError(f"the checkpoint's {key} config cannot be instantiated: {first_line(err)}") from None


def has_ema(ckpt: Mapping[str, Any]) -> bool:
    """True when ``ckpt`` was written with the EMA callback (``state_dict`` = EMA, ``current_model_state`` = raw)."""
    return isinstance(ckpt.get(RAW_KEY), Mapping)


def ddpm_from_checkpoint(
    ckpt: Mapping[str, Any],
    map_location: str | torch.device = "cpu",
    use_ema: bool = False,
    path: str = "<checkpoint>",
) -> DDPM:
    """Rebuild the DDPM from a dict returned by :func:`load_checkpoint` (see :func:`load_ddpm`)."""
    hp = ckpt["hyper_parameters"]
    config = hp["config"]
    net = _instantiate(config["model"], "model")
    schedule = _instantiate(config["schedule"], "schedule")
    sampler = _instantiate(config["sampler"], "sampler") if isinstance(config.get("sampler"), Mapping) else None
    model = DDPM(
        net=net,
        schedule=schedule,
        sampler=sampler,
        objective=stored_value(config, "diffusion.objective"),
        seed=int(hp.get("seed", config.get("seed", 0))),
        image_shape=tuple(hp.get("image_shape", (1, 32, 32))),
        config=dict(config),
    )
    key = "state_dict" if (use_ema or not has_ema(ckpt)) else RAW_KEY
    if use_ema and not has_ema(ckpt):
        log.warning("use_ema=true but %s was trained without EMA: using the raw weights", path)
    try:
        model.load_state_dict(ckpt[key])
    except (RuntimeError, KeyError) as err:
        raise invalid(
            "ckpt_path", path, f"its {key} does not match the stored model config ({first_line(err)})"
        ) from None
    model.eval()
    return model.to(map_location)


def load_ddpm(path: str | os.PathLike[str], map_location: str | torch.device = "cpu", use_ema: bool = False) -> DDPM:
    """Load a ``ddpm-train`` checkpoint as a ready-to-sample :class:`DDPM` in eval mode on ``map_location``.

    The network, schedule and sampler are instantiated from the config stored in the checkpoint, then the
    weights are loaded (strictly). ``use_ema=True`` loads the EMA weights when the run had the EMA callback, and
    otherwise logs a warning and keeps the raw weights; ``use_ema=False`` always loads the raw weights.

    Raises:
        ConfigError: see :func:`load_checkpoint`; also when the stored config cannot be instantiated or the
            weights do not fit it.
    """
    return ddpm_from_checkpoint(load_checkpoint(path), map_location=map_location, use_ema=use_ema, path=str(path))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O that never leaves a half-written checkpoint under the final name.

    Each local save goes to a hidden temporary file in the same folder (:func:`~ddpm_lightning.images.atomic_write`),
    is fsynced, and is then renamed over the target with ``os.replace`` (atomic on POSIX), so a kill during a save
    leaves the previous ``last.ckpt`` intact, and so does a save that the file system refuses (no space left, a
    read-only file system...): that one raises the one-line :class:`~ddpm_lightning.errors.FileSystemError` of its
    kind (``cannot write the checkpoint <path>: no space left on the device; the previous last.ckpt is kept as it
    was; ...``, exit status 7 for no space); a checkpoint whose weights (raw or EMA) hold a NaN or an infinity is
    refused with :class:`~ddpm_lightning.errors.NonFiniteWeightsError` and nothing is written. Lightning's own save
    also uses a temporary file, but fsspec puts it in the system temp folder: on another filesystem the final move
    is a copy into the target, which a kill can cut short (and a 1 GB DiffUNet checkpoint may not fit in ``/tmp``).
    Remote URLs (``s3://`` ...) use Lightning's default path.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        for key in ("state_dict", RAW_KEY):  # check what is saved, not only the loss
            bad = first_non_finite((checkpoint.get(key) or {}).items())
            if bad is not None:
                raise NonFiniteWeightsError(
                    f"refusing to write {path}: {key} tensor {bad} is non-finite (global step "
                    f"{checkpoint.get('global_step')}); the previous checkpoint is kept"
                )
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)

        target = Path(os.fspath(path))
        previous = target.is_file()
        try:
            atomic_write(target, write)
        except Exception as err:
            cause = os_error_behind(err)  # torch's zip writer wraps the file's OSError in a RuntimeError
            if cause is None:
                raise
            kept = f"the previous {target.name} is kept as it was" if previous else f"no {target.name} existed before"
            raise file_system_error(cause, path=target, action="write the checkpoint", kept=kept) from None
