"""Building parts from Hydra config nodes, with the project's one-line errors surfaced."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any, Callable

from hydra.errors import InstantiationException
from hydra.utils import instantiate

from ddpm_lightning.data import MNISTDataError
from ddpm_lightning.errors import ConfigError, first_line, invalid


def build(node: Any, key: str | None = None, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate(node, **kwargs)`` with one-line errors.

    A :class:`ConfigError` or :class:`MNISTDataError` raised by the target is re-raised as itself (it already names
    the key). Any other failure to build the node (a typo'd argument, a value the library refuses, e.g.
    ``trainer.precision=bf17``) becomes a :class:`ConfigError` naming ``key`` and the first line of the library's
    message when ``key`` is given; without ``key`` Hydra's exception propagates unchanged.
    """
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, (ConfigError, MNISTDataError)):
            raise cause from None
        if key is None:
            raise
        target = node.get("_target_", "?") if hasattr(node, "get") else "?"
        raise ConfigError(f"{key} is invalid: cannot build {target}: {first_line(cause or err)}") from None


def check_group_choices(overrides: list[str], config_dir: str | Path) -> None:
    """Check ``group=option`` command-line overrides against the files in ``conf/<group>/``, so that a typo such as
    ``sampler=dim`` is one line (``sampler='dim' is invalid: must be one of ['ddim', 'ddpm']``) rather than Hydra's
    multi-line search-path report. Sweep lists (``model=a,b``) are checked item by item; Hydra's own groups
    (``hydra/...``), sweep functions (``choice(...)``) and ``null`` are left to Hydra.

    Raises:
        ConfigError: the first unknown option.
    """
    for arg in overrides:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        group = Path(config_dir) / key
        if key.startswith("hydra") or "." in key or not group.is_dir() or "(" in value:
            continue
        options = sorted(p.stem for p in group.glob("*.yaml"))
        for choice in value.split(","):
            if choice.strip() not in options and choice.strip() != "null":
                raise invalid(key, choice.strip(), f"must be one of {options}")


def cli(config_dir: str | Path) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a ``@hydra.main`` entry point: check the ``group=option`` overrides in ``sys.argv`` first (one line
    on stderr and exit status 2 for an unknown option), then hand over to Hydra."""

    def wrap(hydra_main: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(hydra_main)
        def entry(*args: Any, **kwargs: Any) -> Any:
            if not args and not kwargs:
                try:
                    check_group_choices(sys.argv[1:], config_dir)
                except ConfigError as err:
                    print(f"error: {err}", file=sys.stderr, flush=True)
                    sys.exit(2)
            return hydra_main(*args, **kwargs)

        return entry

    return wrap
