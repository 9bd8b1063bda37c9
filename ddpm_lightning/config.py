"""Building parts from Hydra config nodes, with the project's one-line errors surfaced."""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Callable

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ddpm_lightning.data import MNISTDataError
from ddpm_lightning.errors import ConfigError, first_line, invalid


def _config_dir() -> Path:
    """The Hydra config folder: ``ddpm_lightning/conf`` inside an installed wheel (pyproject.toml maps the repo's
    top-level ``conf/`` there), else the repo's ``conf/`` next to the package (a source checkout or ``pip install
    -e``)."""
    package = Path(__file__).resolve().parent
    installed = package / "conf"
    return installed if (installed / "train.yaml").is_file() else package.parent / "conf"


#: Absolute path of the folder holding ``train.yaml``, ``sample.yaml``, ``evaluate.yaml`` and the config groups.
CONFIG_DIR = str(_config_dir())


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


def check_group_choices(
    overrides: list[str], config_dir: str | Path, exclude: Mapping[str, Iterable[str]] | None = None
) -> None:
    """Check ``group=option`` command-line overrides against the files in ``conf/<group>/``, so that a typo such as
    ``sampler=dim`` is one line (``sampler='dim' is invalid: must be one of ['ddim', 'ddpm']``) rather than Hydra's
    multi-line search-path report. Sweep lists (``model=a,b``) are checked item by item; Hydra's own groups
    (``hydra/...``), sweep functions (``choice(...)``) and ``null`` are left to Hydra. ``exclude`` names options that
    exist but that this command does not take (``{"sampler": ["checkpoint"]}`` for ``ddpm-train``).

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
        options = sorted(p.stem for p in group.glob("*.yaml") if p.stem not in set((exclude or {}).get(key, ())))
        for choice in value.split(","):
            if choice.strip() not in options and choice.strip() != "null":
                raise invalid(key, choice.strip(), f"must be one of {options}")


def cli(
    config_dir: str | Path, exclude: Mapping[str, Iterable[str]] | None = None
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a ``@hydra.main`` entry point: check the ``group=option`` overrides in ``sys.argv`` first (one line
    on stderr and exit status 2 for an unknown option, see :func:`check_group_choices`), then hand over to Hydra."""

    def wrap(hydra_main: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(hydra_main)
        def entry(*args: Any, **kwargs: Any) -> Any:
            if not args and not kwargs:
                try:
                    check_group_choices(sys.argv[1:], config_dir, exclude)
                except ConfigError as err:
                    print(f"error: {err}", file=sys.stderr, flush=True)
                    sys.exit(2)
            return hydra_main(*args, **kwargs)

        return entry

    return wrap


#: Marker key of ``conf/sampler/checkpoint.yaml``: "use the sampler stored in the checkpoint".
FROM_CHECKPOINT = "from_checkpoint"
#: The sampler of checkpoints that stored none (the DDPM module's own default: ancestral sampling, all T steps).
DEFAULT_SAMPLER_NODE = {
    "_target_": "ddpm_lightning.samplers.DDPMSampler", "variance": "fixed_small", "clip_denoised": True, "steps": None
}


def sampler_node(requested: Any, stored: Any) -> tuple[dict[str, Any], str]:
    """The sampler config that ``ddpm-sample`` / ``ddpm-evaluate`` (and ``ddpm-train``'s end-of-run evaluation)
    build, and a few words on where it came from.

    Args:
        requested: the composed ``sampler`` node: ``conf/sampler/checkpoint.yaml`` (the default: the checkpoint's own
            sampler, with any non-null key of the node replacing the stored value), a full sampler node
            (``sampler=ddim``, ``sampler=ddpm``: used as it is), or None (the checkpoint's).
        stored: the checkpoint's ``config["sampler"]`` (None for a checkpoint that stored none).

    Returns:
        ``(node, source)``, e.g. ``({"_target_": ...DDIMSampler, "steps": 20, "eta": 1.0, ...},
        "the checkpoint's sampler, with steps=20")``.

    Raises:
        ConfigError: a key set for the checkpoint's sampler that this sampler does not have (``sampler.eta`` for a
            stored DDPMSampler), naming the key and how to choose another sampler.
    """
    if requested is not None and not isinstance(requested, Mapping):
        requested = OmegaConf.to_container(requested, resolve=True)
    if requested is not None and not requested.get(FROM_CHECKPOINT):
        return dict(requested), "chosen on the command line"
    base = dict(stored) if isinstance(stored, Mapping) else dict(DEFAULT_SAMPLER_NODE)
    changes = {k: v for k, v in (requested or {}).items() if k != FROM_CHECKPOINT and v is not None}
    target = str(base.get("_target_", "?")).rsplit(".", 1)[-1]
    for key, value in changes.items():
        if key not in base:
            raise invalid(
                f"sampler.{key}", value, f"the checkpoint's sampler {target} has no such option; "
                "choose another sampler with sampler=ddim or sampler=ddpm"
            )
    changed = {k: v for k, v in changes.items() if base[k] != v}
    base.update(changes)
    source = "the checkpoint's sampler" + (f", with {', '.join(f'{k}={v}' for k, v in changed.items())}" if changed else "")
    return base, source
