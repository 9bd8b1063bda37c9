"""The project's user-facing error: one line that names the key, the value and what is allowed."""

from __future__ import annotations

from pathlib import Path
from typing import Any


_UNSET = object()


class ConfigError(ValueError):
    """A bad configuration value, raised before any work starts.

    The message is one line, e.g. ``beta_end=1.5 is invalid: must be in (0, 1)``. A component names its own
    parameter (``key``); :func:`ddpm_lightning.config.build` and :func:`ddpm_lightning.config.at_key` prefix the key
    path of its config node (``schedule.beta_end=1.5 is invalid: ...``), and the one command wrapper
    (:func:`ddpm_lightning.config.run_command`) prints it without a traceback and exits with status 2.

    Attributes:
        key: the parameter the message starts with (``"beta_end"``), or None for a message about no single key.
    """

    def __init__(self, message: str, key: str | None = None, value: object = _UNSET, allowed: str | None = None):
        super().__init__(message)
        self.key, self.value, self.allowed = key, value, allowed

    def at(self, prefix: str | None) -> "ConfigError":
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


class NonFiniteError(RuntimeError):
    """Training produced NaN or infinite numbers; entry points print the one-line message and exit with status 3.
    Raised before anything non-finite is saved, so the newest checkpoint is the last good one."""


class NonFiniteLossError(NonFiniteError):
    """A NaN or infinite loss; raised before the optimizer step, so no checkpoint holds the corrupted weights. The
    message names the global step, the loss and the learning rate."""


class NonFiniteWeightsError(NonFiniteError):
    """A NaN or infinite parameter or optimizer state right after an optimizer step (a finite loss can still give
    non-finite weights, e.g. with a huge learning rate), or in a checkpoint about to be written. The message names
    the global step and the first bad tensor."""


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


def flag(cfg: Any, key: str) -> bool:
    """``cfg[key]``, which must be a real boolean."""
    value = cfg.get(key)
    if not isinstance(value, bool):
        raise invalid(key, value, "must be true or false")
    return value


def int_at_least(cfg: Any, key: str, low: int, what: str) -> int:
    """``cfg[key]``, which must be an integer >= ``low`` (``what`` says so in the error)."""
    value = cfg.get(key)
    if not is_int(value) or value < low:
        raise invalid(key, value, what)
    return value


def out_dir_path(cfg: Any, command: str) -> Path:
    """``cfg.out_dir`` as a path; a clear error when it is unset (``${hydra:...}`` outside a Hydra run) or empty."""
    try:
        value = cfg.get("out_dir")
    except Exception:  # ${hydra:runtime.output_dir} outside a Hydra run
        raise ConfigError(f"out_dir is not set: pass out_dir=<folder> when not running through {command}") from None
    if value is None or str(value) == "":
        raise invalid("out_dir", value, "must be a folder path")
    return Path(str(value)).expanduser()
