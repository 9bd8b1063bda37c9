"""``ddpm-train``: compose ``conf/train.yaml``, add what the command line knows, train (:mod:`ddpm_lightning.training`).

Usage (see README): ``ddpm-train experiment=seed data.root=../shared/data``;
sweeps: ``ddpm-train -m schedule.beta_end=0.02,0.1,0.2``; resume: ``ddpm-train ckpt_path=<run>/checkpoints/last.ckpt``.

Hyperparameter search: ``ddpm-train -m hparams_search=beta_optuna ...`` (``pip install -e ".[search]"``); each job
returns its ``optimized_metric`` to the sweeper (:mod:`ddpm_lightning.search`).

Exit statuses: 2 for bad input (one line on stderr, before any work); 3 for a non-finite loss or non-finite weights
after a step (the newest checkpoint is the last good one; under an optimising sweeper the trial reports the worst
value instead and the search goes on); 143 for SIGTERM; 75 for a Slurm job that saved and requeued itself
(``requeued: ...``, :mod:`ddpm_lightning.requeue`); 1 on a DDP rank whose peer has ended. When the file system
refuses a path (one line naming ``run_dir``, ``hydra.run.dir`` or ``hydra.sweep.dir`` and the path; ``run_dir`` and
Hydra's folder are tried before Hydra starts): 4 permission denied, 5 read-only file system, 6 no such folder (or a
path under a regular file), 7 no space left on the device or disk quota exceeded (a checkpoint save that fails so
keeps the previous ``last.ckpt`` as it was, and the line says how to resume), 8 any other refusal.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import time
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from ddpm_lightning.config import CONFIG_DIR, _is_sweep, _overrides, command, compose_config
from ddpm_lightning.errors import ConfigError, NonFiniteError, invalid, print_error
from ddpm_lightning.search import check_optimized_metric, objective, sweeper_direction, warn, worst
from ddpm_lightning.slurm import catch_warning_signals, check_launcher, ignore_warning_signals

#: conf/sampler/checkpoint.yaml is for ddpm-sample / ddpm-evaluate only (ddpm-train refuses it in one line)
TRAIN_EXCLUDED_SAMPLER = "checkpoint"


def refuse_local_multirun_ddp(cfg: DictConfig) -> None:
    """Lightning's DDP starts its extra processes by re-running the command line: under a local ``-m`` sweep each
    child would run the whole sweep again. Refuse that combination before any work; SLURM (submitit) is fine,
    since srun starts one task per GPU and Lightning does not relaunch."""
    if not HydraConfig.initialized() or "ddp" not in str(cfg.trainer.get("strategy", "auto")):
        return
    hydra_cfg = HydraConfig.get()
    if str(hydra_cfg.mode) == "RunMode.MULTIRUN" and "BasicLauncher" in str(hydra_cfg.launcher.get("_target_", "")):
        raise invalid(
            "trainer.strategy",
            str(cfg.trainer.strategy),
            "a local multirun (-m) cannot start DDP jobs (every DDP child would rerun the sweep); "
            'use hydra/launcher=slurm (pip install -e ".[slurm]") or run the sweep points one by one',
        )


def run(cfg: DictConfig) -> float | None:
    """Train as configured; returns the value of ``optimized_metric`` (what an optimising sweeper such as Optuna
    minimises; see :func:`ddpm_lightning.search.objective`), None on DDP ranks other than 0.

    Under an optimising sweeper, a trial that diverges (:class:`~ddpm_lightning.errors.NonFiniteError`) returns the
    worst value of the search's direction (``inf`` when minimising) with a ``warning:`` line, so the study goes on."""
    catch_warning_signals()  # a Slurm job: from now on, Slurm's warning signal only records a request
    from ddpm_lightning.training import RunContext, train  # Lightning: imported after the command line is checked

    refuse_local_multirun_ddp(cfg)
    context, direction = RunContext(), None
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        context = RunContext(
            hydra_cfg.runtime.output_dir,
            OmegaConf.to_container(hydra_cfg.runtime.choices),
            list(hydra_cfg.overrides.task),
            started=_job_started(hydra_cfg),
        )
        direction = sweeper_direction(hydra_cfg)
    try:
        result: dict[str, Any] = train(cfg, context)
    except NonFiniteError as err:
        if direction is None:
            raise
        value = worst(direction)
        warn(f"{err}; this trial reports optimized_metric={value} (ranked last) and the search goes on")
        return value
    finally:
        ignore_warning_signals()  # a Slurm job: the work is over; a late warning must not kill the exiting process
    if not result["trainer"].is_global_zero:
        return None
    return objective(cfg, result["metrics"], direction)


#: ``time.monotonic()`` when :func:`main` started: the clock of ``budget.minutes`` (ddpm_lightning/budget.py).
_started: float | None = None


def _job_started(hydra_cfg: Any) -> float:
    """The clock of this job's ``budget.minutes``: the command's start for a single run, now for the jobs of a sweep
    (each job has the whole budget)."""
    if _started is None or str(hydra_cfg.mode) == "RunMode.MULTIRUN":
        return time.monotonic()
    return _started


EXCLUDE = {"sampler": [TRAIN_EXCLUDED_SAMPLER]}
_entry = command("train", exclude=EXCLUDE, folders=("run_dir",))(run)


def has_optuna_sweeper() -> bool:
    """Whether hydra-optuna-sweeper (the ``search`` extra) is installed."""
    try:
        return importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is not None
    except ModuleNotFoundError:  # no hydra_plugins namespace at all
        return False


def check_search(args: list[str]) -> None:
    """Before Hydra starts (no sweep folder, no study yet): an ``hparams_search`` needs the Optuna sweeper installed,
    and ``optimized_metric`` must be a metric the composed config can produce.

    Raises:
        ConfigError: one line naming ``hparams_search`` or ``optimized_metric`` (and any error of the command line,
            as :func:`~ddpm_lightning.config.compose_config` reports it).
    """
    for arg in args:
        key, _, value = arg.partition("=")
        if key.lstrip("+") == "hparams_search" and value != "null" and not has_optuna_sweeper():
            raise invalid("hparams_search", value, 'needs the Optuna sweeper: pip install -e ".[search]"')
    check_optimized_metric(compose_config("train", args, EXCLUDE))


def _first_items(args: list[str]) -> list[str]:
    """The overrides with each sweep (``a,b``) replaced by its first item; ``choice(...)`` / ``range(...)`` left out."""
    out = []
    for prefix, key, value in _overrides(args):
        if _is_sweep(value):
            if re.match(r"^\s*\w+\(", value):
                continue
            value = next(iter(_split_sweep(value)))
        out.append(f"{prefix}{key}={value}")
    return out


def _split_sweep(value: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, ch in enumerate(value):
        depth += ch in "[{("
        depth -= ch in "]})"
        if ch == "," and depth == 0:
            items.append(value[start:i])
            start = i + 1
    return [*items, value[start:]]


def check_slurm_launcher(args: list[str]) -> None:
    """Before ``ddpm-train -m hydra/launcher=slurm*`` submits anything: the launcher plugin is installed, and the
    job's tasks fit the trainer (:func:`ddpm_lightning.slurm.check_launcher`, with each sweep's first item).

    Raises:
        ConfigError: one line naming ``hydra/launcher``, ``hydra.launcher.gpus_per_node``, ``trainer.devices`` or
            ``trainer.num_nodes``.
    """
    choice = next((v for _, k, v in _overrides(args) if k == "hydra/launcher"), None)
    if choice is None or not choice.startswith("slurm"):
        return
    if importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None:
        raise invalid("hydra/launcher", choice, 'needs hydra-submitit-launcher: pip install -e ".[slurm]"')
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=_first_items(args), return_hydra_config=True)

    def value(node: Any, key: str) -> Any:
        try:
            return node[key]  # resolves an interpolation (tasks_per_node: ${hydra.launcher.gpus_per_node})
        except Exception:
            return None

    launcher = {key: value(cfg.hydra.launcher, key) for key in ("gpus_per_node", "tasks_per_node", "nodes")}
    trainer = {key: value(cfg.trainer, key) for key in ("devices", "num_nodes") if key in cfg.trainer}
    check_launcher(launcher, choice, trainer)


def main() -> Any:
    """Console entry point: :func:`check_search` and :func:`check_slurm_launcher`, then the command's own checks and
    Hydra (one ``error:`` line on stderr and exit status 2 for bad input)."""
    global _started
    _started = time.monotonic()
    args = sys.argv[1:]
    if not any(a in ("-h", "--help", "--hydra-help", "--info", "-i") or a.startswith("--cfg") for a in args):
        try:
            check_search(args)
            check_slurm_launcher(args)
        except ConfigError as err:
            print_error(err)
            sys.exit(2)
    return _entry()


if __name__ == "__main__":
    main()
