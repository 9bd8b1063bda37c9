"""The project's user-facing error: one line that names the key, the value and what is allowed."""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad configuration value, raised before any work starts.

    The message is one line, e.g. ``schedule.beta_end=1.5 is invalid: must be in (0, 1)``; entry points print
    it without a traceback and exit with status 2.
    """


def invalid(key: str, value: object, allowed: str) -> ConfigError:
    """Build the standard message ``<key>=<value> is invalid: <allowed>``."""
    return ConfigError(f"{key}={value!r} is invalid: {allowed}")


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; raised before the optimizer step, so no checkpoint holds the
    corrupted weights. The message names the global step, the loss and the learning rate."""
