"""Building parts from Hydra config nodes, with the project's one-line errors surfaced."""

from __future__ import annotations

from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate

from ddpm_lightning.data import MNISTDataError
from ddpm_lightning.errors import ConfigError


def build(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate(node, **kwargs)``; a :class:`ConfigError` or :class:`MNISTDataError` raised by the
    target is re-raised as itself (one line naming the key), not wrapped in Hydra's multi-line exception."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, (ConfigError, MNISTDataError)):
            raise err.__cause__ from None
        raise
