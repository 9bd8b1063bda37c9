"""What ``ddpm-train`` returns to a Hydra sweeper that optimises (``hparams_search=beta_optuna``: Optuna's TPE), and
the one Hydra callback such a search needs.

* ``optimized_metric`` (``conf/train.yaml``) names the figure a run returns: a logged metric (``val/loss``,
  ``train/loss_epoch``, ``val/bpd`` ...) or a figure of the end-of-run evaluation (``fid``, ``bpd`` ...).
  :func:`check_optimized_metric` refuses, before any work, a name that this config cannot produce (one line naming
  ``optimized_metric``, the value and the names it can produce); :func:`objective` picks the value after the run.
* A trial that diverges (a non-finite loss or weights) or ends with a non-finite figure reports the worst value of
  the search's direction (``inf`` when minimising, ``-inf`` when maximising): a completed trial that TPE ranks last,
  so the study goes on. Measured with hydra-optuna-sweeper 1.3.0 / optuna 2.10.1: a NaN return crashes the whole
  study (optuna's ``tell`` refuses NaN, then the sweeper's fallback tells FAIL *with* the NaN, which optuna refuses
  again), and None marks the trial FAIL but logs "Failed ... max_failure_rate=0.0" and, when every trial failed,
  the sweep ends with a traceback at ``study.best_trial``.
* :class:`MakeSweepDir`: Optuna opens ``storage: sqlite:///${hydra.sweep.dir}/optuna.db`` before the launcher
  creates the sweep folder (sqlite: "unable to open database file"); this callback creates it first.

No Lightning import here: ``ddpm-train`` checks the command line with it before Lightning loads.
"""

from __future__ import annotations

import difflib
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from ddpm_lightning.errors import invalid

#: Logged by every run (ddpm_lightning/module.py): the training loss (per step and per epoch) and the validation loss
#: with its timestep quartiles (a quartile no validation t fell into is not logged).
RUN_METRICS = (
    "train/loss",
    "train/loss_step",
    "train/loss_epoch",
    "val/loss",
    "val/loss_q0",
    "val/loss_q1",
    "val/loss_q2",
    "val/loss_q3",
)
#: With diffusion.loss=hybrid or vlb: the two parts of the loss.
VB_METRICS = tuple(f"train/{part}{suffix}" for part in ("mse", "vb") for suffix in ("", "_step", "_epoch"))
#: With callbacks.bpd on (every_n_epochs > 0): the bound of validation images.
BPD_CALLBACK_METRICS = ("val/bpd", "val/bpd_prior", "val/bpd_vb", "val/bpd_decoder")
#: With an ``evaluate:`` node: the classifier figures; with evaluate.nll=true also the bound in bits/dim.
SAMPLE_METRICS = ("fid", "fid_floor", "confident_fraction", "normalised_entropy", "inception_score")
NLL_METRICS = ("bpd", "bpd_stderr", "bpd_all_pixels")


#: What a metric that this config cannot produce needs (for the error message).
NEEDS = {
    **{name: "an evaluate: node, e.g. ++evaluate.num_samples=1000" for name in SAMPLE_METRICS},
    **{name: "an evaluate: node with nll=true: ++evaluate.nll=true" for name in NLL_METRICS},
    "label_accuracy": "an evaluate: node and a class-conditional model, e.g. model.num_classes=10",
    **{name: "callbacks.bpd.every_n_epochs=1" for name in BPD_CALLBACK_METRICS},
    "val/fid": "callbacks.fid.every_n_epochs=1",
    **{name: "diffusion.loss=hybrid or vlb" for name in VB_METRICS},
    "train/lr": "an lr_scheduler, e.g. lr_scheduler=onecycle",
}


def _on(node: Any) -> bool:
    """A callback node that is there and not switched off (``every_n_epochs: 0``)."""
    return isinstance(node, Mapping) and bool(node.get("every_n_epochs", 1))


def metric_names(cfg: Any) -> list[str]:
    """The metric names a run of the composed ``conf/train.yaml`` ``cfg`` can return (``sorted``): what
    ``train()`` puts in ``result["metrics"]`` (Lightning's logged metrics and, with ``evaluate``, the evaluation's
    :data:`~ddpm_lightning.hparams.EVAL_METRICS` figures), e.g. ``fid`` only with an ``evaluate:`` node and
    ``val/bpd`` only with ``callbacks.bpd.every_n_epochs > 0``."""
    names = list(RUN_METRICS)
    if (cfg.get("diffusion") or {}).get("loss", "simple") != "simple":
        names += VB_METRICS
    if cfg.get("lr_scheduler") is not None:
        names.append("train/lr")
    callbacks = cfg.get("callbacks") or {}
    if _on(callbacks.get("fid")):
        names.append("val/fid")
    if _on(callbacks.get("bpd")):
        names += BPD_CALLBACK_METRICS
    evaluate = cfg.get("evaluate")
    if evaluate is not None:
        names += SAMPLE_METRICS
        if (cfg.get("model") or {}).get("num_classes") is not None:
            names.append("label_accuracy")
        if evaluate.get("nll"):
            names += NLL_METRICS
    return sorted(set(names))


def check_optimized_metric(cfg: Any) -> None:
    """``cfg.optimized_metric`` must be one of :func:`metric_names` (a config without the key passes).

    Raises:
        ConfigError: ``optimized_metric='fdi' is invalid: this run produces no such metric (did you mean fid?); it
            produces: confident_fraction, fid, ...`` (or ``(val/bpd needs callbacks.bpd.every_n_epochs=1)``).
    """
    if "optimized_metric" not in cfg:
        return
    name, names = cfg.get("optimized_metric"), metric_names(cfg)
    if name not in names:
        nearest = difflib.get_close_matches(str(name), [*names, *NEEDS], n=1, cutoff=0.6)
        hint = (
            f" ({name} needs {NEEDS[name]})" if name in NEEDS else f" (did you mean {nearest[0]}?)" if nearest else ""
        )
        raise invalid(
            "optimized_metric", name, f"this run produces no such metric{hint}; it produces: {', '.join(names)}"
        )


def worst(direction: str) -> float:
    """The value a sweeper ranks last: ``inf`` for ``minimize``, ``-inf`` for ``maximize``."""
    return -math.inf if "max" in str(direction).lower() else math.inf


def warn(message: str) -> None:
    """``warning: <message>`` on stderr in one write (a trial's failure that does not end the search)."""
    sys.stderr.write(f"warning: {message}\n")
    sys.stderr.flush()


def objective(cfg: Any, metrics: Mapping[str, float], direction: str | None) -> float | None:
    """The value of ``cfg.optimized_metric`` in a finished run's ``metrics``.

    Args:
        cfg: the run's config (``optimized_metric`` absent: ``val/loss``).
        metrics: ``train()``'s ``result["metrics"]`` (name -> float).
        direction: ``minimize`` / ``maximize`` when an optimising sweeper uses the value (see
            :func:`sweeper_direction`), else None.

    Returns:
        The value; under an optimising sweeper a non-finite one becomes :func:`worst` (with a warning on stderr).
        Outside one, a missing metric is None (nothing reads the value; the run itself succeeded).

    Raises:
        ConfigError: under an optimising sweeper, the metric is not among ``metrics`` (e.g. ``val/loss`` of a run
            that never validated), naming ``optimized_metric``, the value and the metrics the run has.
    """
    name = cfg.get("optimized_metric", "val/loss")
    if name not in metrics:
        if direction is None:
            return None
        hint = (
            " (no validation ran: trainer.val_check_interval > the steps trained?)"
            if str(name).startswith("val/")
            else ""
        )
        raise invalid(
            "optimized_metric",
            name,
            f"the run logged no such metric{hint}; it has: {', '.join(sorted(metrics)) or 'none'}",
        )
    value = float(metrics[name])
    if direction is not None and not math.isfinite(value):
        warn(
            f"optimized_metric={name} is {value}; the trial reports {worst(direction)} (ranked last) "
            "and the search goes on"
        )
        return worst(direction)
    return value


def sweeper_direction(hydra_cfg: Any) -> str | None:
    """``minimize`` or ``maximize`` when this job runs under a sweeper that optimises the return value (a multirun
    whose sweeper is not Hydra's BasicSweeper; its ``direction``, default ``minimize``), else None. ``hydra_cfg``:
    ``HydraConfig.get()``, or None outside Hydra."""
    if hydra_cfg is None or str(hydra_cfg.mode) != "RunMode.MULTIRUN":
        return None
    sweeper = hydra_cfg.get("sweeper") or {}
    if "BasicSweeper" in str(sweeper.get("_target_", "BasicSweeper")):
        return None
    return "maximize" if "max" in str(sweeper.get("direction", "minimize")).lower() else "minimize"


class MakeSweepDir(Callback):
    """Hydra callback (``hydra.callbacks``) that creates ``hydra.sweep.dir`` when a multirun starts, before the
    sweeper opens a storage there (Optuna's ``sqlite:///${hydra.sweep.dir}/optuna.db``)."""

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        Path(str(config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
