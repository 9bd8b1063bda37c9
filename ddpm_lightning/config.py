"""The configuration boundary: building parts from Hydra nodes, the commands' option schemas, and the one wrapper
that turns a project error into one line on stderr and an exit status.

* :func:`build` instantiates a config node and gives any error of a component its key path: a component names
  its own parameter (``eta=-1 is invalid: ...``) and ``build(node, "callbacks.fid")`` reports
  ``callbacks.fid.sampler.eta=-1 is invalid: ...``. :func:`at_key` does the same for any other call.
* :class:`SampleConfig`, :class:`EvaluateOptions` and :class:`EvaluateConfig` are the typed schemas of
  ``ddpm-sample``, ``ddpm-evaluate`` and the ``evaluate:`` node of ``ddpm-train`` (registered in Hydra's
  ConfigStore; the yaml files in ``conf/`` set their values). A value of the wrong type is one line.
* :func:`command` makes a Hydra entry point: it checks the command line first (an unknown group option, an unknown
  key with the nearest valid one, a value of the wrong type: one line and exit status 2) and runs the command
  under :func:`run_command`.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from ddpm_lightning.errors import ConfigError, FileSystemError, ProjectError, first_line, invalid, print_error


def _config_dir() -> Path:
    """The Hydra config folder: ``ddpm_lightning/conf`` inside an installed wheel (pyproject.toml maps the repo's
    top-level ``conf/`` there), else the repo's ``conf/`` next to the package (a source checkout or ``pip install
    -e``)."""
    package = Path(__file__).resolve().parent
    installed = package / "conf"
    return installed if (installed / "train.yaml").is_file() else package.parent / "conf"


#: Absolute path of the folder holding ``train.yaml``, ``sample.yaml``, ``evaluate.yaml`` and the config groups.
CONFIG_DIR = str(_config_dir())


# --------------------------------------------------------------------------------------------------- building
@contextlib.contextmanager
def at_key(key: str | None) -> Iterator[None]:
    """Inside the block, a :class:`ConfigError` gets the key path ``key`` in front (``ConfigError.at``)."""
    try:
        yield
    except ConfigError as err:
        raise err.at(key) from None


def _is_node(value: Any) -> bool:
    return isinstance(value, Mapping) and "_target_" in value


def build(node: Any, key: str | None = None, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate(node, **kwargs)``, with the key path in every error.

    Nested nodes with a ``_target_`` (``callbacks.fid.sampler``) are built first, each under its own key path, and
    passed to their parent as objects. A :class:`ConfigError` raised by a component is re-keyed under ``key``
    (``eta=-1 ...`` -> ``sampler.eta=-1 ...``); a data error passes unchanged; any other failure to build (a typo'd
    argument, a value the library refuses, e.g. ``trainer.precision=bf17``) becomes
    ``<key> is invalid: cannot build <target>: <first line of the library's message>``.

    Args:
        node: a DictConfig or mapping with ``_target_`` (None builds None).
        key: the node's key path in the composed config (``"schedule"``, ``"callbacks.fid"``), or None for a node
            that has none (its errors are then unprefixed).
        kwargs: extra arguments for the target (objects are passed as they are).
    """
    if node is None:
        return None
    if isinstance(node, (DictConfig, ListConfig)):
        node = OmegaConf.to_container(node, resolve=True)
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    children = {
        name: build(value, f"{key}.{name}" if key else str(name)) for name, value in node.items() if _is_node(value)
    }
    rest = {name: value for name, value in node.items() if name not in children}
    try:
        return instantiate(rest, **children, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, ConfigError):
            raise cause.at(key) from None
        if isinstance(cause, ProjectError):
            raise cause from None
        if key is None:
            raise
        raise ConfigError(
            f"{key} is invalid: cannot build {node.get('_target_', '?')}: {first_line(cause or err)}"
        ) from None


# --------------------------------------------------------------------------------------------------- schemas
@dataclass
class SamplingOptions:
    """The options of drawing samples from a checkpoint, shared by ``ddpm-sample`` and ``ddpm-evaluate``."""

    num_samples: int = MISSING
    batch_size: int = MISSING
    seed: int = MISSING
    device: str = MISSING
    use_ema: bool = MISSING
    guidance_scale: float = MISSING
    sampler: Any = MISSING
    overwrite: bool = MISSING


@dataclass
class SampleConfig(SamplingOptions):
    """``ddpm-sample``'s options: their types (this schema) and their values and meaning (``conf/sample.yaml``)."""

    ckpt_path: str = MISSING
    trajectory: bool = MISSING
    trajectory_frames: int = MISSING
    class_label: int | None = MISSING
    out_dir: Any = MISSING
    task_name: str = MISSING


@dataclass
class EvaluationData:
    """``data.root``: the directory containing ``MNIST/raw`` (the real test and training images)."""

    root: str = MISSING


@dataclass
class EvaluateOptions(SamplingOptions):
    """The keys of ``ddpm-train``'s ``evaluate:`` node (an end-of-run ``ddpm-evaluate`` of ``last.ckpt``): their
    types; their values and meaning are in ``conf/evaluate.yaml``."""

    n: int | None = MISSING
    classifier_path: str | None = MISSING
    train_classifier_if_missing: bool = MISSING
    classifier_epochs: int = MISSING
    inception_fid: bool = MISSING
    nll: bool = MISSING
    nll_n: int = MISSING
    nll_variance: str | None = MISSING


@dataclass
class EvaluateConfig(EvaluateOptions):
    """``ddpm-evaluate``'s options: :class:`EvaluateOptions` plus what to evaluate and where to write."""

    samples: str | None = MISSING
    ckpt_path: str | None = MISSING
    data: EvaluationData = field(default_factory=EvaluationData)
    out_dir: Any = MISSING
    task_name: str = MISSING


@dataclass
class TrainClassifierConfig:
    """``ddpm-train-classifier``'s options: types here, values and meaning in ``conf/train_classifier.yaml``."""

    data: EvaluationData = field(default_factory=EvaluationData)
    out: str | None = MISSING
    epochs: int = MISSING
    seed: int = MISSING
    batch_size: int = MISSING
    lr: float = MISSING
    augment: bool = MISSING
    max_steps: int | None = MISSING
    train_size: int | None = MISSING


def _register_schemas() -> None:
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="sample_schema", node=SampleConfig)
    store.store(name="evaluate_schema", node=EvaluateConfig)
    store.store(name="train_classifier_schema", node=TrainClassifierConfig)


#: Marker key of ``conf/sampler/checkpoint.yaml``: "use the sampler stored in the checkpoint".
FROM_CHECKPOINT = "from_checkpoint"


def options(cfg: Any, schema: type, command: str) -> Any:
    """The composed ``cfg`` as an instance of the dataclass ``schema`` (types checked by OmegaConf), with
    ``out_dir`` resolved to a :class:`~pathlib.Path`.

    Raises:
        ConfigError: a key the schema lacks (naming the nearest valid key), a value of the wrong type, or an
            ``out_dir`` that cannot be resolved (``${hydra:...}`` outside a Hydra run: pass ``out_dir=<folder>``).
    """
    node = (
        OmegaConf.create(OmegaConf.to_container(cfg, resolve=False)) if not isinstance(cfg, DictConfig) else cfg.copy()
    )
    with one_line_omegaconf(node, ""):
        node = OmegaConf.merge(OmegaConf.structured(schema), node)
    if "out_dir" in node:
        node.out_dir = str(out_dir_path(node, command))
    with one_line_omegaconf(node, ""):
        opts = OmegaConf.to_object(node)
    if hasattr(opts, "out_dir") and opts.out_dir is not None:
        opts.out_dir = Path(opts.out_dir)
    return opts


def check_out_dir(out_dir: Path, holds: str, overwrite: bool) -> None:
    """``out_dir`` must be a folder (or not exist yet) and, unless ``overwrite``, not already hold ``holds`` (a
    file name relative to it): nothing already written is replaced by accident. It must also be creatable and
    writable (:func:`ddpm_lightning.filesystem.check_writable_folder`).

    Raises:
        ConfigError: naming ``out_dir``.
        FileSystemError: naming ``out_dir``: permission denied, read-only file system, a missing folder or a file on
            the way, no space left (exit statuses 4-8).
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise invalid("out_dir", str(out_dir), "exists and is not a folder")
    if (out_dir / holds).exists() and not overwrite:
        raise invalid(
            "out_dir",
            str(out_dir),
            f"already holds {holds}; set overwrite=true to replace it, or choose another out_dir",
        )
    from ddpm_lightning.filesystem import check_writable_folder

    check_writable_folder("out_dir", str(out_dir))


def out_dir_path(cfg: Any, command: str) -> Path:
    """``cfg.out_dir`` as a path; a clear error when it is unset (``${hydra:...}`` outside a Hydra run) or empty."""
    try:
        value = cfg.get("out_dir")
    except Exception:  # ${hydra:runtime.output_dir} outside a Hydra run
        raise ConfigError(f"out_dir is not set: pass out_dir=<folder> when not running through {command}") from None
    if value is None or str(value) == "":
        raise invalid("out_dir", value, "must be a folder path")
    return Path(str(value)).expanduser()


_TYPE_WORDS = {
    "Integer": "must be an integer",
    "Float": "must be a number",
    "bool": "must be true or false",
    "str": "must be a string",
}


@contextlib.contextmanager
def one_line_omegaconf(node: Any, prefix: str, given: Mapping[str, Any] | None = None) -> Iterator[None]:
    """OmegaConf's multi-line key and type errors as one-line :class:`ConfigError` s under ``prefix``; ``given``:
    the values set on the command line (quoted instead of the node's)."""
    from omegaconf.errors import ConfigKeyError, ValidationError

    try:
        yield
    except (ConfigKeyError, ValidationError) as err:
        key = f"{prefix}{err.full_key}" if getattr(err, "full_key", None) else prefix.rstrip(".") or "?"
        text = str(err).splitlines()[0]
        if isinstance(err, ConfigKeyError) and "not in" in text:
            leaf = str(err.key) if getattr(err, "key", None) is not None else key.rsplit(".", 1)[-1]
            parent = key[: -len(leaf)].rstrip(".") if key.endswith(leaf) else ""
            raise unknown_key_error(key, (given or {}).get(key, _select(node, key)), _paths(node), parent) from None
        words = next((w for name, w in _TYPE_WORDS.items() if f"to {name}" in text or f"valid {name}" in text), text)
        value = (given or {}).get(key, _select(node, key) if getattr(err, "value", None) is None else err.value)
        raise invalid(key, value, words) from None


def _select(node: Any, key: str) -> Any:
    try:
        return OmegaConf.select(node, key, throw_on_missing=False)
    except Exception:
        return None


# --------------------------------------------------------------------------------------------- the command line
def _paths(node: Any, prefix: str = "") -> list[str]:
    """Every dotted key path of a composed config (nodes and leaves)."""
    out: list[str] = []
    if isinstance(node, (DictConfig, Mapping)):
        items = node.items_ex(resolve=False) if isinstance(node, DictConfig) else node.items()
        for k, v in items:
            path = f"{prefix}.{k}" if prefix else str(k)
            out.append(path)
            out.extend(_paths(v, path))
    return out


def unknown_key_error(
    key: str,
    value: Any,
    known: Iterable[str],
    parent: str = "",
    add: str = "",
    absent: Iterable[str] = (),
    absent_add: str = "+",
    text: str | None = None,
) -> ConfigError:
    """``<key>=<value> is invalid: no such key; did you mean <nearest>?`` (one line), the nearest valid key chosen
    among ``known`` and ``absent`` by its last part first (``label_dropout`` -> ``diffusion.label_dropout``), then by
    spelling.

    Args:
        add: the override prefix the suggestion needs (``++`` below a node that may be null).
        absent: real options that the composed config does not list (a node's ``_target_`` takes them:
            :func:`target_options`); a suggestion among them gets ``absent_add`` (``+``, or ``++``) in front, which
            Hydra needs to add a key.
        text: the value as typed on the command line, for the suggestion (default: ``value`` written back).
    """
    absent = set(absent) - set(known)
    known = sorted(set(known) | absent)
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [k for k in known if k.rsplit(".", 1)[-1] == leaf]
    siblings = [k for k in known if (k.rsplit(".", 1)[0] if "." in k else "") == parent]
    nearest = (
        same_leaf[:1]
        or difflib.get_close_matches(key, siblings or known, n=1, cutoff=0.5)
        or difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    )
    shown = _text(value) if text is None else text
    if nearest:
        prefix = add or (absent_add if nearest[0] in absent else "")
        return invalid(key, value, f"no such key; did you mean {prefix}{nearest[0]}={shown}?")
    names = ", ".join(k.rsplit(".", 1)[-1] for k in siblings[:12]) or "none"
    return invalid(key, value, f"no such key; the keys{f' of {parent}' if parent else ''} are: {names}")


#: Arguments of a target that the code passes itself (a key set for them would be passed twice), by target.
PASSED_BY_CODE: dict[str, tuple[str, ...]] = {
    "lightning.Trainer": ("callbacks", "logger"),
    "lightning.pytorch.Trainer": ("callbacks", "logger"),
}

#: Nodes without a ``_target_`` whose keys are the arguments of a class (or the fields of a schema), by command:
#: ``{config name: {node: (class, arguments the code passes itself, the name in messages)}}``.
NODE_OWNERS: dict[str, dict[str, tuple[str, tuple[str, ...], str]]] = {
    "train": {
        "diffusion": (
            "ddpm_lightning.module.DDPM",
            ("net", "schedule", "optimizer", "sampler", "seed", "config", "lr_scheduler"),
            "ddpm_lightning.module.DDPM",
        ),
        "evaluate": ("ddpm_lightning.config.EvaluateOptions", (), "ddpm-evaluate (conf/evaluate.yaml)"),
    },
}


def _arguments(target: str, skip: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The keyword arguments of ``target`` (a class or function by its dotted name) that have a default, less
    ``skip`` and :data:`PASSED_BY_CODE`, read from its source without importing it
    (:func:`ddpm_lightning.targets.keyword_arguments`); () when the source cannot say."""
    from ddpm_lightning.targets import keyword_arguments

    passed = set(skip) | set(PASSED_BY_CODE.get(target, ()))
    return tuple(name for name in keyword_arguments(target) or () if name not in passed)


def _dict_nodes(node: Any, prefix: str = "") -> Iterator[tuple[str, DictConfig]]:
    if isinstance(node, DictConfig):
        yield prefix, node
        for k, v in node.items_ex(resolve=False):
            yield from _dict_nodes(v, f"{prefix}.{k}" if prefix else str(k))


def target_options(config_name: str, cfg: DictConfig) -> dict[str, str]:
    """Every real option of ``cfg``'s nodes, listed in the config or not: ``{dotted key: what takes it}``, from the
    signature of each node's ``_target_`` (``trainer.max_time``: ``lightning.Trainer``; ``callbacks.samples.
    guidance_scale``: ``ddpm_lightning.callbacks.SampleCallback``) and of the :data:`NODE_OWNERS` of this command
    (``evaluate.guidance_scale``: ddpm-evaluate's), read from their source files (nothing is imported)."""
    owners = NODE_OWNERS.get(config_name, {})
    out: dict[str, str] = {}
    for path, node in _dict_nodes(cfg):
        if "_target_" in node and isinstance(node.get("_target_"), str):
            target = str(node.get("_target_"))
            names, owner = _arguments(target), target
        elif path in owners:
            names, owner = _arguments(owners[path][0], owners[path][1]), owners[path][2]
        else:
            continue
        for name in names:
            out[f"{path}.{name}" if path else name] = owner
    return out


def _text(value: Any) -> str:
    """A value as it is typed on the command line (``true``, ``null``, ``0.5``, ``abc``)."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _group_options(config_dir: Path, group: str, exclude: Mapping[str, Iterable[str]] | None) -> list[str]:
    skip = set((exclude or {}).get(group, ()))
    return sorted(p.stem for p in (config_dir / group).glob("*.yaml") if p.stem not in skip)


def training_samplers() -> str:
    """The samplers ``ddpm-train`` builds, as the command line names them, read from ``conf/sampler/`` (all but
    ``checkpoint``, which only ddpm-sample and ddpm-evaluate take):
    ``sampler=ddim, sampler=ddpm, ... or sampler=...``."""
    names = [f"sampler={n}" for n in _group_options(Path(CONFIG_DIR), "sampler", {"sampler": ["checkpoint"]})]
    return ", ".join(names[:-1]) + " or " + names[-1]


def _overrides(argv: list[str]) -> list[tuple[str, str, str]]:
    """``(prefix, key, value)`` of each ``key=value`` word (``prefix`` is ``+``, ``++``, ``~`` or empty)."""
    out = []
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        prefix = re.match(r"^[+~]*", key).group(0)
        out.append((prefix, key[len(prefix) :], value))
    return out


def _is_sweep(value: str) -> bool:
    depth = 0
    for ch in value:
        depth += ch in "[{("
        depth -= ch in "]})"
        if ch == "," and depth == 0:
            return True
    return bool(re.match(r"^\s*(choice|range|interval|glob|tag)\(", value))


def check_group_choices(
    overrides: list[str], config_dir: str | Path, exclude: Mapping[str, Iterable[str]] | None = None
) -> None:
    """Check ``group=option`` command-line overrides against the files in ``conf/<group>/``, so that a typo such as
    ``sampler=dim`` is one line (``sampler='dim' is invalid: must be one of ['ddim', 'ddpm', 'dpmpp']``) rather than
    Hydra's multi-line search-path report. Sweep lists (``model=a,b``) are checked item by item; Hydra's own groups
    (``hydra/...``), sweep functions (``choice(...)``) and ``null`` are left to Hydra. ``exclude`` names options that
    exist but that this command does not take (``{"sampler": ["checkpoint"]}`` for ``ddpm-train``).

    Raises:
        ConfigError: the first unknown option.
    """
    for _, key, value in _overrides(overrides):
        group = Path(config_dir) / key
        if key.startswith("hydra") or "." in key or not group.is_dir() or "(" in value:
            continue
        options_ = _group_options(Path(config_dir), key, exclude)
        for choice in value.split(","):
            if choice.strip() not in options_ and choice.strip() != "null":
                raise invalid(key, choice.strip(), f"must be one of {options_}")


def _compose(config_name: str, overrides: list[str], hydra_node: bool = False) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():  # inside a running Hydra app (same config folder)
        return compose(config_name=config_name, overrides=overrides, return_hydra_config=hydra_node)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides, return_hydra_config=hydra_node)


@functools.lru_cache(maxsize=64)
def _composed_groups_cached(config_name: str, groups: tuple[str, ...]) -> DictConfig:
    base = _compose(config_name, list(groups))
    OmegaConf.set_readonly(base, True)  # shared between calls: read, never written
    return base


def _composed_groups(config_name: str, groups: list[str]) -> DictConfig:
    """``conf/<config_name>.yaml`` composed with only the group choices (``model=adm_tiny`` ...): the key check's
    reference. Read-only; composed once per process for each choice of groups (every test composes the same few), except
    inside a running Hydra app, whose search path it must follow."""
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return _compose(config_name, groups)
    return _composed_groups_cached(config_name, tuple(groups))


def compose_config(
    config_name: str,
    overrides: list[str] = (),
    exclude: Mapping[str, Iterable[str]] | None = None,
    hydra_node: bool = False,
) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with command-line ``overrides`` as the command does, with one-line
    errors: an unknown group option, an unknown key (naming the nearest valid key, e.g. ``num_sample=5 is invalid:
    no such key; did you mean num_samples=5?``) or a value of the wrong type for a schema (``num_samples=1.5 is
    invalid: must be an integer``). Sweep values (``a,b``, ``choice(...)``) are checked by key only; the first item
    of a group sweep picks the group option for the key check.

    ``hydra_node=True`` keeps Hydra's own node (``hydra.run.dir`` ...) in the result, for
    :func:`check_output_folders`.

    Raises:
        ConfigError: the first bad override.
    """
    from hydra.errors import HydraException

    overrides = list(overrides)
    check_group_choices(overrides, CONFIG_DIR, exclude)
    parsed = _overrides(overrides)
    group_overrides = [
        (p, k, v)
        for p, k, v in parsed
        if (Path(CONFIG_DIR) / k).is_dir() and "(" not in v and not k.startswith("hydra")
    ]
    # a group sweep (experiment=a,b) composes with its first item, for the key check and the final compose alike
    groups = [f"{p}{k}={v.split(',')[0] if _is_sweep(v) else v}" for p, k, v in group_overrides]
    base = _composed_groups(config_name, groups)
    known = _paths(base)
    for prefix, key, value in parsed:
        if prefix or key.startswith("hydra") or (Path(CONFIG_DIR) / key).is_dir() or key in known:
            continue
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        above = OmegaConf.select(base, parent, throw_on_missing=False) if parent in known else {}
        if above is None:  # a null node (evaluate: null): its keys are added, not overridden
            raise invalid(key, _typed(value), f"{parent} is null in this config; add the key with ++{key}={value}")
        if parent and parent in known and not isinstance(above, DictConfig):
            continue  # below a list or a value: Hydra decides
        # a real option that this config does not list (lightning.Trainer's max_time ...): Hydra adds it with + (++
        # where a group sweep may compose configs that do list it)
        options_ = target_options(config_name, base)
        add = "++" if any(_is_sweep(v) for _, _, v in group_overrides) else "+"
        if key in options_:
            raise invalid(
                key,
                _typed(value),
                f"not in this config, but an option of {options_[key]}; add it with {add}{key}={value}",
            )
        raise unknown_key_error(key, _typed(value), known, parent, absent=options_, absent_add=add, text=value)
    plain = [f"{p}{k}={v}" for p, k, v in parsed if not _is_sweep(v)]
    plain += [group for group, (_, _, v) in zip(groups, group_overrides, strict=True) if _is_sweep(v)]
    try:
        return _compose(config_name, plain, hydra_node)
    except HydraException as err:
        cause = err.__cause__ if err.__cause__ is not None else err
        given = {k: _typed(v) for _, k, v in parsed}
        with one_line_omegaconf(base, "", given):
            raise cause from None
        raise


def _typed(text: str) -> Any:
    """A command-line value as Hydra reads it (``1.5`` -> 1.5, ``maybe`` -> 'maybe', ``00:00:10:00`` -> the string,
    where YAML 1.1 would read a base-60 integer), for quoting it in a message; a sweep (``a,b``) as its text."""
    import yaml

    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parsed = OverridesParser.create().parse_override(f"key={text}")
        if not parsed.is_sweep_override():
            return parsed.value()
    except Exception:
        pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def run_command(fn: Callable[[Any], Any], cfg: Any) -> Any:
    """Run a command's body; a project error (:class:`~ddpm_lightning.errors.ProjectError`: bad config or data,
    non-finite training, SIGTERM, a lost DDP peer, a path the file system refuses) becomes ``error: <one line>`` on
    stderr and its exit status. An ``OSError`` that is the file system's answer (or a ``RuntimeError`` raised while
    handling one, as torch's writer does) and that no part of the command has turned into its line yet becomes the
    :class:`~ddpm_lightning.errors.FileSystemError` of its kind here, naming the option whose path holds the file
    (:func:`path_option`): exit status 4 permission denied, 5 read-only file system, 6 no such folder or a path under
    a file, 7 no space left, 8 any other refusal."""
    try:
        return fn(cfg)
    except ProjectError as err:
        print_error(err)
        sys.exit(err.exit_status)
    except (OSError, RuntimeError) as err:
        from ddpm_lightning.filesystem import file_system_error, os_error_behind

        cause = os_error_behind(err, depth=0 if isinstance(err, OSError) else 1)  # torch wraps the file's OSError
        if cause is None:
            raise
        key, value, mode = path_option(cfg, cause.filename)
        named = cause.filename is not None or value is None  # else: the option's own folder, "cannot write in <it>"
        fault = file_system_error(
            cause, key, value, path=None if named else value, action=mode if named else f"{mode} in", mode=mode
        )
        print_error(fault)
        sys.exit(fault.exit_status)


#: The options that name paths: ``(key, "write" | "read")``, outputs first.
PATH_OPTIONS = (
    ("run_dir", "write"),
    ("out_dir", "write"),
    ("out", "write"),
    ("ckpt_path", "read"),
    ("samples", "read"),
    ("classifier_path", "read"),
    ("data.root", "read"),
    ("sweep", "read"),
)


def path_option(cfg: Any, filename: Any) -> tuple[str | None, Any, str]:
    """``(key, value, mode)`` of the option of :data:`PATH_OPTIONS` whose path holds ``filename`` (the longest one
    that does), else of the first output option the config has, else ``(None, None, "write")``. ``cfg``: a composed
    config, or the ``argparse.Namespace`` of ``ddpm-report`` (``out`` is its ``--out``)."""
    import argparse
    import os

    found: list[tuple[str, Any, str, Path]] = []
    for key, mode in PATH_OPTIONS:
        try:
            if isinstance(cfg, argparse.Namespace):
                value = getattr(cfg, key, None)
                if value is None and key == "out":
                    value = getattr(cfg, "sweep", None)  # ddpm-report writes into the sweep folder by default
                shown = f"--{key}" if key == "out" else key
            else:
                value, shown = OmegaConf.select(cfg, key, default=None), key
        except Exception:
            continue
        if isinstance(value, (str, Path)) and str(value):
            found.append((shown, value, mode, Path(os.path.abspath(Path(str(value)).expanduser()))))
    if filename is not None:
        target = Path(os.path.abspath(os.fsdecode(filename)))
        holders = [f for f in found if target == f[3] or f[3] in target.parents]
        if holders:
            key, value, mode, _ = max(holders, key=lambda f: len(str(f[3])))
            return key, value, mode
    outputs = [f for f in found if f[2] == "write"]
    return (outputs[0][0], outputs[0][1], "write") if outputs else (None, None, "write")


def check_output_folders(
    cfg: DictConfig, args: list[str], folders: Iterable[str] = (), files: Iterable[str] = ()
) -> None:
    """Before Hydra starts: the folder Hydra creates (``hydra.run.dir``, ``hydra.sweep.dir`` under ``-m``), each
    option of ``folders`` (``run_dir``, ``out_dir``) and the folder of each option of ``files`` (``out``) must be
    creatable and writable (:func:`ddpm_lightning.filesystem.check_writable_folder`). An option still at a
    ``${hydra:...}`` value (the run folder: checked as ``hydra.run.dir``), null or swept is not checked here.

    Args:
        cfg: the command's config composed with ``hydra_node=True``.
        args: the command line (``-m`` / ``--multirun`` picks ``hydra.sweep.dir``).

    Raises:
        FileSystemError: one line naming the key and the path (exit statuses 4-8).
    """
    from ddpm_lightning.filesystem import check_writable_folder

    hydra_key = "hydra.sweep.dir" if any(a in ("-m", "--multirun") for a in args) else "hydra.run.dir"
    checks: list[tuple[str, str, Path]] = []
    hydra_dir = _resolved(cfg, hydra_key)
    if hydra_dir is not None:
        writes = OmegaConf.select(cfg, "hydra.output_subdir", default=None) is not None
        if writes or not Path(hydra_dir).expanduser().exists():  # Hydra creates it, and writes .hydra/ in it
            checks.append((hydra_key, hydra_dir, Path(hydra_dir)))
    for key in folders:
        value = _resolved(cfg, key)
        if value is not None:
            checks.append((key, value, Path(value)))
    for key in files:
        value = _resolved(cfg, key)
        if value is not None:
            checks.append((key, value, Path(value).expanduser().parent))
    for key, value, path in checks:
        check_writable_folder(key, value, path)


def _resolved(cfg: DictConfig, key: str) -> str | None:
    """``cfg``'s ``key`` as a string, None when it is null, empty, missing or cannot be resolved before Hydra runs."""
    try:
        value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
    except Exception:
        return None
    return str(value) if isinstance(value, (str, Path)) and str(value) else None


def command(
    config_name: str,
    exclude: Mapping[str, Iterable[str]] | None = None,
    folders: Iterable[str] = (),
    files: Iterable[str] = (),
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Make ``fn(cfg)`` a Hydra console entry point on ``conf/<config_name>.yaml``.

    The command line is checked first with :func:`compose_config` (one line on stderr and exit status 2 for a bad
    group option, key or type), then the folders it will write with :func:`check_output_folders` (Hydra's run
    folder, the ``folders`` options, the folders of the ``files`` options: one line and exit status 4-8 when the file
    system refuses, before Hydra creates anything); then Hydra runs ``fn`` under :func:`run_command`. ``exclude``:
    group options this command refuses (``{"sampler": ["checkpoint"]}`` for ``ddpm-train``).
    """
    import hydra

    def wrap(fn: Callable[[Any], Any]) -> Callable[..., Any]:
        @hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name=config_name)
        @functools.wraps(fn)
        def hydra_entry(cfg: DictConfig) -> Any:
            return run_command(fn, cfg)

        @functools.wraps(fn)
        def entry() -> Any:
            args = sys.argv[1:]
            if not any(a in ("-h", "--help", "--hydra-help", "--info", "-i") or a.startswith("--cfg") for a in args):
                try:
                    composed = compose_config(config_name, args, exclude, hydra_node=True)
                    check_output_folders(composed, args, folders, files)
                except (ConfigError, FileSystemError) as err:
                    print_error(err)
                    sys.exit(err.exit_status)
            return hydra_entry()

        return entry

    return wrap


# ------------------------------------------------------------------------------------------------ sampler nodes
#: The sampler of checkpoints that stored none (the DDPM module's own default: ancestral sampling, all T steps).
DEFAULT_SAMPLER_NODE = {
    "_target_": "ddpm_lightning.samplers.DDPMSampler",
    "variance": "fixed_small",
    "clip_denoised": True,
    "steps": None,
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
        ConfigError: a key set for the checkpoint's sampler that this sampler does not have (``eta`` for a
            stored DDPMSampler), naming the key and how to choose another sampler (the caller adds ``sampler.``).
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
                key,
                value,
                f"the checkpoint's sampler {target} has no such option; "
                f"choose another sampler with {training_samplers()}",
            )
    changed = {k: v for k, v in changes.items() if base[k] != v}
    base.update(changes)
    source = "the checkpoint's sampler" + (
        f", with {', '.join(f'{k}={v}' for k, v in changed.items())}" if changed else ""
    )
    return base, source


_register_schemas()
