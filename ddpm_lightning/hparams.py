"""A run's hyperparameters and final metrics in TensorBoard's HParams plugin, so that the jobs of a sweep compare
side by side (``tensorboard --logdir outputs/multirun/<date>/<time>``, tab HPARAMS: one row per job).

* At the start of training, the session's hyperparameters are written once (:func:`write_session_start`): the
  flattened ``schedule``, ``model``, ``optimizer``, ``lr_scheduler`` and ``sampler`` nodes, the seed, the batch size
  and step budget, the config-group choices (``model=adm_fast``) and every key given on the command line, i.e. every
  key a sweep changes. The metric columns :data:`HP_METRICS` are declared with them.
* When the run ends, :func:`log_final_metrics` writes the figures as ordinary scalars (``hp/val_loss``, ``hp/fid``,
  ...; and the end-of-run evaluation's as ``eval/*``). The plugin shows each metric's value at its latest step.

No Lightning or Hydra import here: callers pass plain containers and a ``torch.utils.tensorboard.SummaryWriter``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

#: The metric columns of the HParams table: ``hp/<name>`` <- the run's figure of that name.
HP_METRICS = ("val_loss", "fid", "fid_floor", "confident_fraction", "normalised_entropy", "inception_score", "bpd")
#: The figures of the end-of-run evaluation (``ddpm-evaluate``'s metrics.json names) that a run reports.
EVAL_METRICS = (
    "fid",
    "fid_floor",
    "confident_fraction",
    "normalised_entropy",
    "inception_score",
    "label_accuracy",
    "bpd",
    "bpd_stderr",
    "bpd_all_pixels",
)
#: Config nodes whose leaves are hyperparameters.
HPARAM_GROUPS = ("schedule", "diffusion", "model", "optimizer", "lr_scheduler", "sampler")
#: Single keys that are hyperparameters too.
HPARAM_KEYS = (
    "seed",
    "data.batch_size",
    "data.subset_size",
    "trainer.max_steps",
    "trainer.max_epochs",
    "trainer.precision",
)
#: Command-line keys that are paths or switches, not hyperparameters.
NOT_HPARAMS = ("run_dir", "ckpt_path", "data.root", "overwrite", "data.download")

Scalar = bool | int | float | str


def _plain(value: Any) -> Scalar:
    """A value TensorBoard's hparams summary accepts: bools, ints, finite or not floats and strings as they are;
    None as ``"null"``; anything else (lists, nodes) as its ``str``."""
    if value is None:
        return "null"
    if isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _select(config: Mapping[str, Any], dotted: str) -> tuple[bool, Any]:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def flatten(node: Any, prefix: str = "", skip: Iterable[str] = ()) -> dict[str, Any]:
    """``{"a.b": value}`` for every leaf of nested mappings under ``prefix`` (lists are leaves; a non-mapping
    ``node`` is ``{prefix: node}``); keys named in ``skip`` are left out with what is below them."""
    if not isinstance(node, Mapping):
        return {prefix: node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        if str(key) not in skip:
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key), skip))
    return out


_NOT_LEAVES = ("_target_", "_partial_")


def run_hparams(
    config: Mapping[str, Any], choices: Mapping[str, Any] | None = None, overrides: Iterable[str] = ()
) -> dict[str, Scalar]:
    """The hyperparameters of a run, flat and TensorBoard-ready.

    Args:
        config: the resolved run config as plain containers (what the checkpoint stores).
        choices: Hydra's config-group choices (``{"model": "adm_fast", "schedule": "linear", ...}``); ``hydra/...``
            entries are skipped.
        overrides: the command-line overrides (``["schedule.beta_end=0.1", "model=adm_fast"]``); each key's resolved
            value is included, so every key a sweep changes is a column.

    Returns:
        ``{"schedule.beta_end": 0.02, "model": "adm_fast", "seed": 0, ...}`` with bool/int/float/str values.
    """
    params: dict[str, Any] = {}
    for group in HPARAM_GROUPS:
        node = config.get(group)
        params.update(
            flatten(node, group, _NOT_LEAVES) if isinstance(node, Mapping) else {group: node} if group in config else {}
        )
    for key in HPARAM_KEYS:
        found, value = _select(config, key)
        if found:
            params[key] = value
    for group, choice in (choices or {}).items():
        if not str(group).startswith("hydra") and choice is not None:
            params[str(group)] = choice
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key.startswith("hydra") or key in NOT_HPARAMS or key in params:
            continue
        found, value = _select(config, key)
        if found and not isinstance(value, Mapping):
            params[key] = value
        elif found:
            params.update(flatten(value, key, _NOT_LEAVES))
    return {k: _plain(v) for k, v in sorted(params.items())}


def write_session_start(writer: Any, params: Mapping[str, Scalar], metrics: Iterable[str] = HP_METRICS) -> None:
    """Write the HParams plugin's experiment, session-start and session-end summaries for this run into ``writer``
    (a ``SummaryWriter``), declaring ``hp/<metric>`` columns; their values come later as scalars."""
    from torch.utils.tensorboard.summary import hparams

    exp, ssi, sei = hparams(dict(params), {f"hp/{name}": 0.0 for name in metrics})
    file_writer = writer._get_file_writer()  # as SummaryWriter.add_hparams and Lightning's logger do
    for summary in (exp, ssi, sei):
        file_writer.add_summary(summary)
    file_writer.flush()


def final_metrics(callback_metrics: Mapping[str, float], evaluation: Mapping[str, Any] | None) -> dict[str, float]:
    """The run's end figures as ``{"hp/val_loss": ..., "hp/fid": ..., "eval/fid": ...}`` (finite numbers only).

    ``hp/fid``, ``hp/bpd`` and the other columns come from the end-of-run evaluation when there is one, else
    ``hp/fid`` and ``hp/bpd`` from the last ``val/fid`` / ``val/bpd`` of the FID and bits/dim callbacks. ``eval/<name>``
    repeats every number of the evaluation.
    """
    out: dict[str, float] = {}

    def put(key: str, value: Any) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value)):
            out[key] = float(value)

    put("hp/val_loss", callback_metrics.get("val/loss"))
    put("hp/fid", callback_metrics.get("val/fid"))
    put("hp/bpd", callback_metrics.get("val/bpd"))
    if evaluation:
        for name in EVAL_METRICS:
            put(f"eval/{name}", evaluation.get(name))
            if name in HP_METRICS:
                put(f"hp/{name}", evaluation.get(name))
    return out


def evaluation_metrics(evaluation: Mapping[str, Any] | None) -> dict[str, float]:
    """The :data:`EVAL_METRICS` figures of an end-of-run evaluation that are numbers (``{"fid": 12.5, ...}``;
    non-finite ones included, None left out), under their metrics.json names: ``ddpm-train`` adds them to its
    ``metrics``, next to ``val/loss``, for ``optimized_metric``."""
    return {
        name: float(v)
        for name in EVAL_METRICS
        if isinstance(v := (evaluation or {}).get(name), (int, float)) and not isinstance(v, bool)
    }


def log_final_metrics(writer: Any, values: Mapping[str, float], step: int) -> None:
    """Write ``values`` as scalars at ``step`` (the run's last global step) and flush."""
    for key, value in values.items():
        writer.add_scalar(key, value, global_step=step)
    writer.flush()
