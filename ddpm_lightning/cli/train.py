"""``ddpm-train``: compose ``conf/train.yaml``, add what the command line knows, train (:mod:`ddpm_lightning.training`).

Usage (see README): ``ddpm-train experiment=seed data.root=../shared/data``;
sweeps: ``ddpm-train -m schedule.beta_end=0.02,0.1,0.2``; resume: ``ddpm-train ckpt_path=<run>/checkpoints/last.ckpt``.

Exit statuses: 2 for bad input (one line on stderr, before any work); 3 for a non-finite loss or non-finite weights
after a step (the newest checkpoint is the last good one); 143 for SIGTERM; 1 on a DDP rank whose peer has ended.
"""

from __future__ import annotations

from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from ddpm_lightning.config import command
from ddpm_lightning.errors import invalid

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
    """Train as configured; returns ``val/loss`` (what Hydra sweepers optimise)."""
    from ddpm_lightning.training import RunContext, train  # Lightning: imported after the command line is checked

    refuse_local_multirun_ddp(cfg)
    context = RunContext()
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        context = RunContext(hydra_cfg.runtime.output_dir, OmegaConf.to_container(hydra_cfg.runtime.choices),
                             list(hydra_cfg.overrides.task))
    result: dict[str, Any] = train(cfg, context)
    return result["metrics"].get("val/loss")


main = command("train", exclude={"sampler": [TRAIN_EXCLUDED_SAMPLER]})(run)

if __name__ == "__main__":
    main()
