"""Training a DDPM from a composed ``conf/train.yaml``: the run-level checks, building the parts, Lightning's loop,
and the end-of-run evaluation (the body of ``ddpm-train``, :mod:`ddpm_lightning.cli.train`).

Usage (see README): ``ddpm-train experiment=seed data.root=../shared/data``;
sweeps: ``ddpm-train -m schedule.beta_end=0.02,0.1,0.2``; resume: ``ddpm-train ckpt_path=<run>/checkpoints/last.ckpt``.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from ddpm_lightning import evaluation, signals, slurm
from ddpm_lightning.budget import TimeBudget, parse_minutes
from ddpm_lightning.callbacks import HParamsSession, ProgressBar
from ddpm_lightning.checkpoint import checkpoint_file, load_checkpoint, resume_mismatch
from ddpm_lightning.config import (
    FROM_CHECKPOINT,
    EvaluateConfig,
    EvaluateOptions,
    at_key,
    build,
    compose_config,
    one_line_omegaconf,
    options,
    training_samplers,
    unknown_key_error,
)
from ddpm_lightning.errors import (
    ConfigError,
    FileSystemError,
    PeerRankFailed,
    StoppedBySignal,
    check_bool,
    check_int,
    first_line,
    invalid,
    is_int,
    is_number,
)
from ddpm_lightning.filesystem import (
    check_writable_folder,
    file_system_error,
    is_file_system_error,
    is_under,
    rekey,
    writing,
)
from ddpm_lightning.hparams import evaluation_metrics, final_metrics, run_hparams
from ddpm_lightning.logs import tidy_lightning_output
from ddpm_lightning.module import DDPM, check_conditioning
from ddpm_lightning.runlock import RunDirLock, last_holder
from ddpm_lightning.sampling import learn_sigma_of
from ddpm_lightning.search import check_optimized_metric

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    """What the command line adds to the config (empty outside a Hydra run).

    Attributes:
        output_dir: Hydra's run directory (the default ``run_dir``), or None.
        choices: the config-group choices (``{"model": "adm_fast", ...}``), for the HParams tab.
        overrides: the command-line overrides of this job.
    """

    output_dir: str | None = None
    choices: dict[str, Any] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    #: ``time.monotonic()`` when the command started (the clock of ``budget.minutes``); default: when this was built.
    started: float = field(default_factory=time.monotonic)


def resolve_precision(precision: str, accelerator: str) -> str:
    """``auto`` -> ``bf16-mixed`` on a GPU of compute capability 8.0 or newer (Ampere, Hopper, ...), ``16-mixed`` on an
    older one (V100, T4: ``torch.cuda.is_bf16_supported()`` says yes there too, but bf16 is emulated), ``32-true``
    on a CPU; other values pass unchanged.

    CPUs get fp32: on a 2-core AMD EPYC without AVX-512, bf16 autocast trained ADMUNet 14x slower
    (7.4 vs 102 images/s) and DiffUNet more than 4x slower than fp32 (see docs/measurements.md). With ``16-mixed``,
    Lightning's GradScaler skips the steps whose gradients overflow; that is not a non-finite weight (the weights are
    not touched) and the non-finite guard does not stop for it.
    """
    if str(precision) != "auto":
        return str(precision)
    use_cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if use_cuda and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.get_device_capability() >= (8, 0) else "16-mixed"
    return "32-true"


#: Keys of the ``trainer`` node that are the project's, not ``lightning.Trainer``'s (applied by ddpm-train).
PROJECT_TRAINER_KEYS = ("float32_matmul_precision", "ddp")
MATMUL_PRECISIONS = ("highest", "high", "medium")


def trainer_node(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(node, objects)``: ``cfg.trainer`` for ``lightning.Trainer`` without :data:`PROJECT_TRAINER_KEYS`, and the
    arguments built here: ``strategy: ddp`` becomes :func:`ddpm_lightning.strategy.ddp_strategy` of ``trainer.ddp``
    (a timeout in minutes, no buffer broadcast, gradients as bucket views; ``conf/trainer/ddp.yaml``).

    Raises:
        ConfigError: a bad ``trainer.ddp`` value, naming its key.
    """
    node = OmegaConf.to_container(cfg.trainer, resolve=True)
    options = node.pop("ddp", None) or {}
    for key in PROJECT_TRAINER_KEYS:
        node.pop(key, None)
    objects: dict[str, Any] = {}
    if node.get("strategy") == "ddp":
        from ddpm_lightning.strategy import ddp_strategy

        if not isinstance(options, dict):
            raise invalid("trainer.ddp", options, "must be a node of ddp_strategy's options (conf/trainer/ddp.yaml)")
        try:
            objects["strategy"] = ddp_strategy(**options)
        except TypeError as err:
            raise ConfigError(f"trainer.ddp is invalid: {first_line(err)}") from None
        except ConfigError as err:
            raise err.at("trainer.ddp") from None
        del node["strategy"]
    return node, objects


def apply_matmul_precision(cfg: DictConfig) -> None:
    """``trainer.float32_matmul_precision``: ``highest`` (fp32 matmuls), ``high`` (TF32 on Ampere and newer GPUs,
    ``torch.set_float32_matmul_precision``) or ``medium``; null leaves torch's setting. No effect on a CPU.

    Raises:
        ConfigError: another value.
    """
    value = check_matmul_precision(cfg)
    if value is not None:
        torch.set_float32_matmul_precision(value)


def check_matmul_precision(cfg: DictConfig) -> str | None:
    """``trainer.float32_matmul_precision``: one of :data:`MATMUL_PRECISIONS` or null.

    Raises:
        ConfigError: another value.
    """
    value = cfg.trainer.get("float32_matmul_precision")
    if value is not None and value not in MATMUL_PRECISIONS:
        raise invalid("trainer.float32_matmul_precision", value, f"must be one of {list(MATMUL_PRECISIONS)} or null")
    return value


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The most recently written of ``<run_dir>/checkpoints/last.ckpt`` and the Slurm requeue checkpoints
    ``<run_dir>/hpc_ckpt_<n>.ckpt`` (Lightning's name; saved mid-epoch at Slurm's warning signal or at preemption,
    :mod:`ddpm_lightning.requeue`), or None when there is none."""
    candidates = [p for p in [run_dir / "checkpoints" / "last.ckpt", *run_dir.glob("hpc_ckpt_*.ckpt")] if p.is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime_ns) if candidates else None


def _requeued_in_own_run_dir(run_dir: Path) -> bool:
    """A Slurm job started again (``SLURM_RESTART_COUNT`` > 0) in the run directory that this same job wrote (its lock
    file names this ``SLURM_JOB_ID``): its checkpoints are its own, not another run's."""
    job = slurm.job_id()
    return job is not None and slurm.restart_count() > 0 and last_holder(run_dir).get("slurm_job_id") == job


def prepare_config(cfg: DictConfig, context: RunContext | None = None) -> DictConfig:
    """Check the run-level keys and fill in derived values, before any work starts.

    * ``ckpt_path=last`` resumes from the newest of ``<run_dir>/checkpoints/last.ckpt`` and the Slurm requeue
      checkpoints ``<run_dir>/hpc_ckpt_*.ckpt`` when one exists and starts fresh otherwise, so a requeued (preempted)
      job started with the same command continues. A requeued Slurm job (``SLURM_RESTART_COUNT`` > 0) in the run
      directory it wrote itself resumes the same way with ``ckpt_path=null``.
    * ``ckpt_path`` must be an existing file; resuming from ``<run>/checkpoints/<x>.ckpt`` or
      ``<run>/hpc_ckpt_<n>.ckpt`` writes into ``<run>`` (same checkpoints, samples and TensorBoard run) unless
      ``run_dir`` was set explicitly.
    * A fresh run refuses a ``run_dir`` holding another run's checkpoints (``overwrite=true`` allows it).
    * In a Slurm job, ``trainer.devices`` / ``trainer.num_nodes`` must match its tasks per node / nodes.
    * ``trainer.precision=auto`` is resolved.
    * ``optimized_metric`` must name a metric this config produces (:func:`~ddpm_lightning.search.metric_names`).

    Raises:
        ConfigError: one line naming the key, the value and what is allowed.
    """
    context = context or RunContext()
    with open_dict(cfg):
        run_dir = Path(str(cfg.run_dir))
        requeued = cfg.get("ckpt_path") is None and _requeued_in_own_run_dir(run_dir)
        if str(cfg.get("ckpt_path")) == "last" or requeued:  # preemption-safe: resume from this run dir's checkpoint
            newest = newest_checkpoint(run_dir)
            cfg.ckpt_path = str(newest) if newest else None
            why = (
                f"Slurm job {slurm.job_id()} restarted (SLURM_RESTART_COUNT={slurm.restart_count()}) in its own run_dir"
                if requeued
                else "ckpt_path=last"
            )
            log.info("%s: %s", why, f"resuming from {newest}" if newest else "no checkpoint yet, fresh start")
        if cfg.get("ckpt_path"):
            ckpt = checkpoint_file(str(cfg.ckpt_path)).resolve()
            cfg.ckpt_path = str(ckpt)
            _check_resume(cfg)
            run = _run_dir_of(ckpt)
            if run is not None and str(cfg.run_dir) == str(context.output_dir):
                cfg.run_dir = str(run)
        elif not _flag(cfg, "overwrite"):
            existing = [*sorted((run_dir / "checkpoints").glob("*.ckpt")), *sorted(run_dir.glob("hpc_ckpt_*.ckpt"))]
            if existing:
                raise invalid(
                    "run_dir",
                    str(cfg.run_dir),
                    f"already holds {existing[0].name} from another run; resume with ckpt_path=last, "
                    "choose another run_dir, or set overwrite=true",
                )
        _check_rates(cfg)
        _check_budget(cfg)
        slurm.check_tasks(cfg.trainer)  # in a Slurm job: one rank per task, before anything trains
        check_int("seed", cfg.get("seed"), 0)
        check_optimized_metric(cfg)
        cfg.trainer.precision = resolve_precision(cfg.trainer.precision, str(cfg.trainer.accelerator))
        check_matmul_precision(cfg)
    return cfg


def _run_dir_of(ckpt: Path) -> Path | None:
    """The run directory a checkpoint belongs to: ``<run>`` for ``<run>/checkpoints/x.ckpt`` and for a Slurm requeue
    checkpoint ``<run>/hpc_ckpt_<n>.ckpt``; None for a checkpoint elsewhere."""
    if ckpt.parent.name == "checkpoints":
        return ckpt.parent.parent
    if re.fullmatch(r"hpc_ckpt_\d+\.ckpt", ckpt.name):
        return ckpt.parent
    return None


def _flag(cfg: DictConfig, key: str) -> bool:
    return check_bool(key, cfg.get(key))


#: Rates and scales that must be finite numbers (a finite loss can still give non-finite weights: lr=inf, lr=1e30),
#: as ``(key, lowest allowed, lowest included, may be null)``.
RATE_KEYS = (
    ("optimizer.lr", 0.0, False, False),
    ("optimizer.weight_decay", 0.0, True, False),
    ("optimizer.eps", 0.0, False, False),
    ("lr_scheduler.max_lr", 0.0, False, False),
    ("trainer.gradient_clip_val", 0.0, True, True),
)


def _check_rates(cfg: DictConfig) -> None:
    """Every rate and scale of :data:`RATE_KEYS` that the config has must be a finite number above its bound."""
    for key, low, inclusive, nullable in RATE_KEYS:
        found = OmegaConf.select(cfg, key, default="<absent>")
        if found == "<absent>" or (found is None and nullable):
            continue
        if not is_number(found) or not math.isfinite(found) or not (found >= low if inclusive else found > low):
            bound = f">= {low:g}" if inclusive else f"> {low:g}"
            raise invalid(key, found, f"must be a finite number {bound}" + (" or null" if nullable else ""))


def _check_budget(cfg: DictConfig) -> None:
    """``budget.minutes`` (null, minutes > 0 or "HH:MM:SS") and ``budget.reserve`` (``auto`` or seconds >= 0)."""
    node = cfg.get("budget")
    if node is None:
        return
    parse_minutes(node.get("minutes"))
    reserve = node.get("reserve", "auto")
    if reserve != "auto" and not (is_number(reserve) and math.isfinite(reserve) and reserve >= 0):
        raise invalid("budget.reserve", reserve, "must be auto (measured at start) or a number of seconds >= 0")


#: Seconds kept, on top of the measured sampling, for the rest of the end-of-run work (the last checkpoint, the
#: classifier's pass over the samples, the test images and the floor's training images, writing the files).
END_OF_RUN_FIXED_S = 30.0
#: Head-room on the measured sampling time of the end-of-run work.
END_OF_RUN_MARGIN = 1.3


def _time_calls(net: torch.nn.Module, batch: int, shape: tuple[int, ...], classes: int | None) -> float:
    """Seconds of one no-grad network call at ``batch`` images (the second of two: the first warms up)."""
    x = torch.zeros(batch, *shape)
    t = torch.full((batch,), 500, dtype=torch.long)
    y = (torch.arange(batch) % classes) if classes else None
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            net(x, t, y)
            start = time.perf_counter()
            net(x, t, y)
            return time.perf_counter() - start
    finally:
        net.train(was_training)


def end_of_run_seconds(ddpm: DDPM, samples: Any, eval_opts: EvaluateConfig | None, eval_steps: int | None) -> float:
    """What to keep back from a time budget for the work after training: the picture callback's grid and the
    ``evaluate:`` node's samples, timed from the network's speed here (one call per sampler step and batch; a guided
    call counts twice), times :data:`END_OF_RUN_MARGIN`, plus :data:`END_OF_RUN_FIXED_S`."""
    calls: list[tuple[int, int]] = []  # (batch, calls)
    if samples is not None:
        sampler = samples.sampler or ddpm.sampler
        guided = 2 if getattr(samples, "guidance_scale", 1.0) != 1.0 else 1
        calls.append((samples.num_samples * guided, len(sampler.timesteps(ddpm.schedule.num_timesteps))))
    if eval_opts is not None and eval_steps:
        guided = 2 if eval_opts.guidance_scale != 1.0 else 1
        full, rest = divmod(eval_opts.num_samples, eval_opts.batch_size)
        calls.append((eval_opts.batch_size * guided, full * eval_steps))
        if rest:
            calls.append((rest * guided, eval_steps))
    seconds = sum(n * _time_calls(ddpm.net, batch, ddpm.image_shape, ddpm.num_classes) for batch, n in calls if n)
    return END_OF_RUN_MARGIN * seconds + END_OF_RUN_FIXED_S


def _build_budget(
    cfg: DictConfig, context: RunContext, ddpm: DDPM, callbacks: dict[str, Any], eval_opts: EvaluateConfig | None
) -> TimeBudget | None:
    """The :class:`~ddpm_lightning.budget.TimeBudget` of ``budget.minutes`` (None without one): its deadline is the
    command's start + the budget - the end-of-run work (``budget.reserve``, measured here when ``auto``)."""
    node = cfg.get("budget")
    minutes = parse_minutes(node.get("minutes")) if node is not None else None
    if minutes is None:
        return None
    reserve = node.get("reserve", "auto")
    if reserve == "auto":
        eval_steps = None
        if eval_opts is not None:
            from ddpm_lightning.config import sampler_node

            node_, _ = sampler_node(eval_opts.sampler, OmegaConf.to_container(cfg.sampler, resolve=True))
            eval_steps = len(build(node_, key="evaluate.sampler").timesteps(ddpm.schedule.num_timesteps))
        reserve = end_of_run_seconds(ddpm, callbacks.get("samples"), eval_opts, eval_steps)
    deadline = context.started + 60.0 * minutes - float(reserve)
    log.info(
        "time budget: %.1f min for the whole command, %.0f s kept for the end-of-run work; training ends by "
        "%.0f s from now",
        minutes,
        reserve,
        deadline - time.monotonic(),
    )
    return TimeBudget(deadline=deadline, sync_every=int(cfg.trainer.get("log_every_n_steps") or 10))


def _check_resume(cfg: DictConfig) -> None:
    """Refuse a resume checkpoint that is unreadable, unsafe (it would run code when unpickled: read with
    ``weights_only=True``), not from ``ddpm-train``, or whose network or schedule differs from this config, before
    Lightning touches it. The message says which key differs."""
    stored = load_checkpoint(str(cfg.ckpt_path), mmap=True)["hyper_parameters"]["config"]
    diff = resume_mismatch(stored, OmegaConf.to_container(cfg, resolve=True))
    if diff:
        raise invalid(
            "ckpt_path",
            str(cfg.ckpt_path),
            f"the checkpoint does not match the config: {diff}; "
            "resume with the checkpoint's settings or start a new run",
        )


def _check_callback_sampling(
    callbacks: dict[str, Any], num_timesteps: int, learn_sigma: bool, num_classes: int | None
) -> None:
    """The pictures' and FID's samplers (and the pictures' guidance scale) must fit the schedule and the network:
    checked before training, not at the first epoch end."""
    for name, callback in callbacks.items():
        sampler = getattr(callback, "sampler", None)
        if sampler is not None:
            with at_key(f"callbacks.{name}.sampler"):
                sampler.check(num_timesteps, learn_sigma)
        if hasattr(callback, "guidance_scale"):
            with at_key(f"callbacks.{name}"):
                check_conditioning(num_classes, None, callback.guidance_scale)


def _check_val_check_interval(cfg: DictConfig, batches_per_epoch: int) -> None:
    """Lightning refuses an integer ``val_check_interval`` longer than an epoch only once the loop starts (with a
    traceback); say it in one line before any work."""
    interval = cfg.trainer.get("val_check_interval")
    if is_int(interval) and cfg.trainer.get("check_val_every_n_epoch") is not None and interval > batches_per_epoch:
        raise invalid(
            "trainer.val_check_interval",
            interval,
            f"must be <= {batches_per_epoch} (the batches in one epoch), or set trainer.check_val_every_n_epoch=null "
            "to count steps across epochs",
        )


#: Schedules of at most this many steps are run through on a throwaway optimizer before training.
_LR_DRY_RUN_STEPS = 10_000


def _build_lr_scheduler(cfg: DictConfig) -> Any:
    """The ``lr_scheduler`` partial, tried once on a throwaway optimizer so that a bad value (e.g. OneCycleLR with
    ``trainer.max_steps=-1``) is one line before training rather than an exception at the first step."""
    if cfg.get("lr_scheduler") is None:
        return None
    total = cfg.lr_scheduler.get("total_steps")
    if "total_steps" in cfg.lr_scheduler and (not is_int(total) or total < 1):
        raise invalid(
            "lr_scheduler.total_steps", total, "must be an integer >= 1 (it follows trainer.max_steps: set one)"
        )
    factory = build(cfg.lr_scheduler, key="lr_scheduler")
    # Short schedules are stepped through to the end too (~0.1 s per 10,000 steps): OneCycleLR divides by zero with
    # some step counts (trainer.max_steps=20 at pct_start=0.05: a warm-up of zero length), when built or
    # at a later step.
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    try:
        scheduler = factory(optimizer)
        for _ in range(min(int(total), _LR_DRY_RUN_STEPS) if is_int(total) else 0):
            optimizer.step()
            scheduler.step()
    except ZeroDivisionError as err:
        raise invalid(
            "lr_scheduler.total_steps",
            total,
            f"{cfg.lr_scheduler.get('_target_')} cannot run {total} steps "
            f"({first_line(err)}); choose another trainer.max_steps",
        ) from None
    except Exception as err:
        raise ConfigError(
            f"lr_scheduler is invalid: cannot build {cfg.lr_scheduler.get('_target_')}: {first_line(err)}"
        ) from None
    return factory


def train(cfg: DictConfig, context: RunContext | None = None) -> dict[str, Any]:
    """Train a DDPM as configured; returns paths and the final logged metrics.

    Returns:
        dict with ``run_dir``, ``last_ckpt``, ``best_ckpt``, ``samples_dir``, ``tensorboard_dir``,
        ``metrics`` (name -> float: Lightning's logged metrics, ``val/loss`` ..., and with an ``evaluate:`` node the
        evaluation's figures ``fid``, ``bpd`` ... of :data:`~ddpm_lightning.hparams.EVAL_METRICS`), the ``trainer``
        and, with an ``evaluate:`` node, ``evaluation`` (the metrics of ``ddpm-evaluate`` on ``last.ckpt``, also in
        ``<run_dir>/evaluate/step_<N>/metrics.json``). The final
        figures also go to TensorBoard: ``eval/*`` scalars and the ``hp/*`` columns of the HParams tab.

    Raises:
        ConfigError: a bad value (one line naming the key), or a run directory that another ``ddpm-train`` holds
            (:class:`~ddpm_lightning.runlock.RunDirLock`), before any training.
        FileSystemError: ``run_dir`` cannot be created or written (permission denied, read-only file system, a
            missing folder or a file on the way, no space left), before any training; or a write during the run was
            refused (a full disk at a checkpoint save: the newest checkpoint is kept as it was, and the line says so
            and how to resume). One line naming ``run_dir`` and the path; exit statuses 4-8
            (:data:`~ddpm_lightning.errors.FILE_SYSTEM_EXIT_STATUSES`).
        MNISTDataError: missing or corrupt MNIST files, before any training.
        NonFiniteError: a non-finite loss, or non-finite weights after a step; nothing non-finite is saved.
        StoppedBySignal: SIGTERM (a preempted job); the newest complete checkpoint is kept.
        PeerRankFailed: under DDP, another rank has ended.
    """
    context = context or RunContext()
    tidy_lightning_output()  # each log line once, no advertisement (ddpm_lightning/logs.py)
    cfg = prepare_config(cfg, context)
    # One writer per run directory: the rank that writes files holds an OS lock on it until the run ends.
    lock = RunDirLock(str(cfg.run_dir)) if rank_zero_only.rank == 0 else None
    if lock is not None:
        check_writable_folder("run_dir", str(cfg.run_dir))  # permission, read-only, a file on the way: before any work
        with writing("run_dir", str(cfg.run_dir), action="create"):
            lock.acquire()
    last = Path(str(cfg.run_dir)) / "checkpoints" / "last.ckpt"
    try:
        return _fit_and_evaluate(cfg, context)
    except FileSystemError as fault:  # a refused checkpoint save: it names the file and that the previous one is kept
        raise rekey(fault, "run_dir", str(cfg.run_dir), *_kept_and_resume(last)) from None
    except OSError as err:  # another write into the run folder (grids, TensorBoard, the evaluation)
        if not is_file_system_error(err) or not is_under(err.filename, cfg.run_dir):
            raise  # not the file system's, or a file elsewhere (data.root...): run_command names its option
        kept, then = _kept_and_resume(last)
        raise file_system_error(err, "run_dir", str(cfg.run_dir), kept=kept, then=then) from None
    except SIGTERMException:
        raise _stopped(cfg) from None
    except RuntimeError as err:
        if not _peer_failed(err):
            raise
        if signals.SIGTERM_RECEIVED.is_set():  # this rank's own SIGTERM aborted its collectives (abort_on_sigterm)
            raise _stopped(cfg) from None
        raise PeerRankFailed(signals.PEER_GONE.format(why=first_line(err, 200))) from None
    finally:
        if lock is not None:
            lock.release()


def _kept_and_resume(last: Path) -> tuple[str, str | None]:
    """What a run stopped by the file system leaves, and how to go on: ``(kept, then)`` for the one-line error."""
    if last.is_file():
        return f"the newest checkpoint {last} is kept as it was", f"then resume with ckpt_path={last}"
    return "no checkpoint was written yet", None


def _stopped(cfg: DictConfig) -> StoppedBySignal:
    """The SIGTERM stop, naming the checkpoint to resume from: the newest of last.ckpt and a Slurm requeue
    checkpoint."""
    newest = newest_checkpoint(Path(str(cfg.run_dir)))
    resume = f"resume with ckpt_path={newest}" if newest else "no checkpoint was written yet"
    return StoppedBySignal(f"{signals.STOPPED} ({resume})")


def end_of_run_options(cfg: DictConfig, ckpt_path: str | Path, out_dir: str | Path) -> EvaluateConfig:
    """The options of ``ddpm-train``'s end-of-run evaluation: ``conf/evaluate.yaml`` as Hydra composes it, the
    ``evaluate:`` node of the training config on top (its keys and types checked against
    :class:`~ddpm_lightning.config.EvaluateOptions`: an unknown key is one line naming ``evaluate.<key>`` and the
    nearest valid key), then the run's ``data.root``, its checkpoint and ``out_dir`` (one folder per checkpoint
    step, so nothing is overwritten)."""
    node = cfg.get("evaluate")
    node = OmegaConf.create(OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node))
    allowed = [f"evaluate.{name}" for name in EvaluateOptions.__dataclass_fields__]
    for key, value in node.items():
        if f"evaluate.{key}" not in allowed:  # ++: the suggestion works whether or not evaluate is null
            raise unknown_key_error(f"evaluate.{key}", value, allowed, "evaluate", add="++")
    with one_line_omegaconf(node, "evaluate."):
        OmegaConf.merge(OmegaConf.structured(EvaluateOptions), node)
    base = compose_config("evaluate")
    with open_dict(base):
        base.out_dir = str(out_dir)
    merged = OmegaConf.merge(
        base, node, {"samples": None, "ckpt_path": str(ckpt_path), "data": {"root": str(cfg.data.root)}}
    )
    with at_key("evaluate"):
        return options(merged, EvaluateConfig, "ddpm-train")


def best_before_last(callbacks: Iterable[Any]) -> list[Any]:
    """``callbacks`` with every unmonitored ``ModelCheckpoint`` (``last``) after the monitored ones (``best``), the
    order otherwise kept (Lightning then moves all checkpoint callbacks to the end, in this order).

    Both save at the same epoch end; saved first, ``last.ckpt`` recorded the ``best`` callback before its save, so a
    resume from it restored a ``best`` pointing at the file that save had just deleted, and left the new
    ``best-*.ckpt`` untracked (one more orphan per resume, under ``save_top_k: 1``)."""
    callbacks = list(callbacks)
    return sorted(callbacks, key=lambda c: isinstance(c, ModelCheckpoint) and c.monitor is None)


def _fit_and_evaluate(cfg: DictConfig, context: RunContext) -> dict[str, Any]:
    """:func:`train` after its checks, with the run directory locked."""
    run_dir = Path(str(cfg.run_dir))
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    datamodule = build(cfg.data, key="data")
    with at_key("data"):
        datamodule.prepare_data()  # fails here, with the data.root hint, if the files are missing
        datamodule.setup("fit")  # subset_size / val_size against the files on disk, before any training
    _check_val_check_interval(cfg, math.ceil(datamodule.num_train / datamodule.batch_size))
    schedule = build(cfg.schedule, key="schedule")
    if cfg.get("sampler") is not None and cfg.sampler.get(FROM_CHECKPOINT):
        raise invalid(
            "sampler",
            "checkpoint",
            "only ddpm-sample and ddpm-evaluate take the sampler from a "
            f"checkpoint; ddpm-train needs {training_samplers()}",
        )
    sampler = build(cfg.sampler, key="sampler")
    learn_sigma = learn_sigma_of(cfg)
    with at_key("sampler"):
        sampler.check(schedule.num_timesteps, learn_sigma)
    net = build(cfg.model, key="model")
    optimizer = build(cfg.optimizer, key="optimizer")
    lr_scheduler = _build_lr_scheduler(cfg)
    with at_key("diffusion"):  # the DDPM's own options: conf/diffusion/
        ddpm = DDPM(
            net=net,
            schedule=schedule,
            optimizer=optimizer,
            sampler=sampler,
            seed=cfg.seed,
            config=OmegaConf.to_container(cfg, resolve=True),
            lr_scheduler=lr_scheduler,
            **OmegaConf.to_container(cfg.get("diffusion") or OmegaConf.create({}), resolve=True),
        )
    eval_dir = None
    if cfg.get("evaluate") is not None:  # checked now, run after training (the checkpoint does not exist yet)
        eval_dir = run_dir / "evaluate"
        eval_opts = end_of_run_options(cfg, run_dir / "checkpoints" / "last.ckpt", eval_dir)
        with at_key("evaluate"):
            evaluation.check_before_training(
                eval_opts,
                schedule.num_timesteps,
                OmegaConf.to_container(cfg.sampler, resolve=True),
                learn_sigma,
                ddpm.num_classes,
            )
    named = {k: build(c, key=f"callbacks.{k}") for k, c in cfg.get("callbacks", {}).items() if c is not None}
    _check_callback_sampling(named, schedule.num_timesteps, learn_sigma, ddpm.num_classes)
    for name, callback in named.items():
        if hasattr(callback, "check_datamodule"):
            with at_key(f"callbacks.{name}"):
                callback.check_datamodule(datamodule)
    hparams_session = HParamsSession(run_hparams(ddpm.hparams["config"], context.choices, context.overrides))
    callbacks = [*best_before_last(named.values()), hparams_session]
    budget = _build_budget(cfg, context, ddpm, named, eval_opts if eval_dir is not None else None)
    if budget is not None:
        callbacks.append(budget)
    if cfg.trainer.get("enable_progress_bar", True):  # redrawn every trainer.log_every_n_steps steps (no sync per step)
        callbacks.append(ProgressBar())
    logger = build(cfg.logger, key="logger") if cfg.get("logger") else False
    apply_matmul_precision(cfg)
    node, objects = trainer_node(cfg)
    trainer: L.Trainer = build(node, key="trainer", callbacks=callbacks, logger=logger, **objects)
    signals.install(trainer)  # a SIGTERM ends every DDP rank within seconds (no collective in the handler)
    signals.skip_sigterm_broadcast(trainer)  # Lightning's per-step broadcast of the flag: a sync per step under DDP
    signals.abort_on_sigterm()  # NCCL: a rank blocked in a collective or CUDA sync is freed by aborting the group

    trainer.fit(ddpm, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))

    ckpt_dir = run_dir / "checkpoints"
    best = next((c.best_model_path for c in trainer.checkpoint_callbacks if c.monitor), "")
    result = {
        "run_dir": run_dir,
        "last_ckpt": ckpt_dir / "last.ckpt",
        "best_ckpt": Path(best) if best else None,
        "samples_dir": run_dir / "samples",
        "tensorboard_dir": run_dir / "tensorboard",
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        "trainer": trainer,
    }
    if eval_dir is not None and trainer.is_global_zero:
        out = eval_dir / f"step_{trainer.global_step:06d}"
        done = out / evaluation.METRICS_FILE
        if done.is_file():  # a resumed run whose evaluation of this very checkpoint had finished
            print(f"already evaluated: {done}", flush=True)
            result["evaluation"] = json.loads(done.read_text())
        else:
            print(f"evaluating {result['last_ckpt']} into {out} ...", flush=True)
            eval_opts = end_of_run_options(cfg, result["last_ckpt"], out)
            eval_opts.overwrite = True  # what is there is an interrupted evaluation of this same checkpoint: redo it
            result["evaluation"] = evaluation.evaluate(eval_opts)
        result["metrics"].update(evaluation_metrics(result["evaluation"]))
    hparams_session.log_final(trainer, final_metrics(result["metrics"], result.get("evaluation")))
    if trainer.is_global_zero:
        print(
            f"\nDone in {run_dir}\n"
            f"  checkpoint : {result['last_ckpt']}\n"
            f"  samples    : {result['samples_dir']}\n"
            f"  tensorboard: tensorboard --logdir {result['tensorboard_dir']}",
            flush=True,
        )
    return result


def _peer_failed(err: BaseException) -> bool:
    """True for the process group's error when another DDP rank has gone (gloo: "Connection closed by peer")."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return False
    return isinstance(err, getattr(dist, "DistError", ())) or any(
        text in str(err) for text in ("Connection closed by peer", "Connection reset by peer", "NCCL error")
    )
