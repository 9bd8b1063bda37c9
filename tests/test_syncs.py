"""No host sync in a steady training step or sampler step (issue 26), proved on a CPU with the census of
:mod:`ddpm_lightning.sync_census` (every ``.item()``, ``bool()``, ``int()``, ``float()``, ``.tolist()``, ``.cpu()``,
``.numpy()``, ``nonzero`` and boolean-mask index of a tensor counted, with where it came from) for each preset, with
a tiny network and data. The only reads allowed are on the check steps, every ``trainer.log_every_n_steps``: the
non-finite check's one read, the progress bar's redraw and Lightning's logger (which turns each logged metric into a
float: once the check has drained the queue these cost a copy each, not a wait). On CUDA the same runs also go
under ``torch.cuda.set_sync_debug_mode("error")`` for the steady steps (skipped without a GPU)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf, open_dict

from ddpm_lightning.sync_census import SyncCensus, cuda_sync_debug
from ddpm_lightning.training import train

from conftest import compose_train

STEPS, EVERY = 12, 4  #: optimizer steps per run; trainer.log_every_n_steps (checks at steps 3, 7, 11)
PRESETS = {
    # importance-sampled timesteps, v objective, Min-SNR, SDE-DPM-Solver++, the time budget (ddpm_lightning/budget.py)
    "mnist_cpu": [],
    "mnist_cpu_cfg": ["model.num_classes=10"],  # labels, label dropout, guided pictures
    "seed": [],  # DDPM ancestral sampling (the DiffUNet adapter: test_the_diffunet_adapter_step_has_no_sync)
    "iddpm": ["trainer.max_time=null", "model.learn_sigma=true"],  # learned variances, L_hybrid, cosine schedule
}
#: Where a read may happen on a check step: the check itself, the progress bar's redraw, Lightning's logger.
CHECK_STEP_READS = (
    "ddpm_lightning/module.py",
    "ddpm_lightning/callbacks.py",
    "lightning/fabric/utilities/apply_func.py",
)

_CENSUS: SyncCensus | None = None
_CUDA_ERROR_STEPS: set[int] = set()


class StepLabel(L.Callback):
    """Labels the census's events with the optimizer step whose batch is running (the check of step k runs at its
    end); on CUDA turns the sync debug mode to ``error`` for the steps in ``_CUDA_ERROR_STEPS``."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        _CENSUS.label = trainer.global_step
        if torch.cuda.is_available() and trainer.strategy.root_device.type == "cuda":
            torch.cuda.set_sync_debug_mode("error" if trainer.global_step in _CUDA_ERROR_STEPS else 0)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        _CENSUS.label = "epoch end"
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode(0)


def _overrides(preset: str, root: Path, run: Path, device: str) -> list[str]:
    over = [
        f"experiment={preset}",
        "model=adm_tiny",
        f"data.root={root}",
        "data.batch_size=4",
        "data.subset_size=64",
        "data.val_size=8",
        f"trainer.max_steps={STEPS}",
        "trainer.max_epochs=-1",
        f"trainer.log_every_n_steps={EVERY}",
        "trainer.val_check_interval=null",
        "trainer.check_val_every_n_epoch=1",
        "callbacks.samples=null",
        "evaluate=null",
        f"run_dir={run}",
        "trainer.enable_progress_bar=true",
        *PRESETS[preset],
    ]
    if device == "cuda":
        over += ["trainer=gpu", "trainer.enable_progress_bar=true"]
    return over


def _check_step(step: int) -> bool:
    return (step + 1) % EVERY == 0


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(
                not torch.cuda.is_available(), reason="no CUDA GPU: the sync debug mode runs only there"
            ),
        ),
    ],
)
# the CPU presets' batches of 64 and 128 take ~3.5 s each on the slower 2-core kind: the full tier only
@pytest.mark.parametrize(
    "preset", [pytest.param(p, marks=pytest.mark.slow) if p.startswith("mnist_cpu") else p for p in PRESETS]
)
def test_a_steady_training_step_and_sampler_step_have_no_host_sync(preset, device, fake_mnist_root, tmp_path):
    global _CENSUS
    cfg = compose_train(_overrides(preset, fake_mnist_root, tmp_path / "run", device))
    with open_dict(cfg):
        cfg.callbacks.label = {"_target_": f"{__name__}.StepLabel"}
    steady = range(1, STEPS)  # step 0 builds Adam's state and the first EMA copy
    _CUDA_ERROR_STEPS.clear()
    _CUDA_ERROR_STEPS.update(s for s in steady if not _check_step(s) and s + 1 < STEPS)
    _CENSUS = SyncCensus()
    with _CENSUS:
        result = train(cfg)
    census = _CENSUS
    assert result["trainer"].global_step == STEPS
    for step in steady:
        if not _check_step(step):
            assert census.count(step) == 0, f"{preset}: step {step} synced:\n{census.summary(step)}"
        else:  # the check's one read (+ the bar's and the logger's, after it): nowhere else
            events = [e for e in census.events if e.label == step]
            assert [e.kind for e in events if "ddpm_lightning/module.py" in e.where] == ["tolist"], census.summary(step)
            assert all(any(w in e.where for w in CHECK_STEP_READS) for e in events), census.summary(step)
            assert len(events) <= 6, census.summary(step)

    # a few sampler steps of the preset's sampler (and the pictures' guidance), labelled by network call
    module = result["trainer"].lightning_module
    sampler = module.sampler
    if sampler.steps is None or sampler.steps > 4:
        sampler = _with_steps(sampler, 4)
    calls = []
    handle = module.net.register_forward_pre_hook(lambda *_: calls.append(1) or setattr(census, "label", len(calls)))
    # the preset's guidance (the test's overrides turn its picture callback off)
    guidance = OmegaConf.select(compose_train([f"experiment={preset}"]), "evaluate.guidance_scale") or 1.0
    try:
        with SyncCensus() as census, cuda_sync_debug("warn"):
            census.label = 0
            module.sample(
                3, sampler=sampler, generator=torch.Generator(module.device).manual_seed(0), guidance_scale=guidance
            )
    finally:
        handle.remove()
    assert len(calls) >= 3
    for call in range(1, len(calls) + 1):
        assert census.count(call) == 0, f"{preset}: sampler step {call} synced:\n{census.summary(call)}"


def _with_steps(sampler, steps: int):
    """The same sampler with ``steps`` steps (rebuilt from its constructor arguments)."""
    import inspect

    params = inspect.signature(type(sampler)).parameters
    kwargs = {name: getattr(sampler, name) for name in params if hasattr(sampler, name)}
    kwargs["steps"] = steps
    return type(sampler)(**kwargs)


def test_the_diffunet_adapter_step_has_no_sync():
    """DiffUNet (experiment=seed's network) forward and backward: no sync (deepinv's own timestep_embedding copies its
    frequencies from the CPU at every call; the adapter keeps them on the device, the same values)."""
    from deepinv.models.diffunet import timestep_embedding

    from ddpm_lightning.networks import DiffUNetEps

    torch.manual_seed(0)
    net = DiffUNetEps()
    t = torch.tensor([0, 1, 17, 999, 500])
    assert torch.equal(net.timestep_embedding(t), timestep_embedding(t, net.net.model_channels))
    x, t = torch.randn(1, 1, 32, 32), torch.tensor([321])
    with SyncCensus() as census:
        net(x, t).square().mean().backward()
    assert census.count() == 0, census.summary()
    with torch.no_grad():  # the adapter is deepinv's own timestep path, bit for bit
        net.eval()
        assert torch.equal(net(x, t), net.net(x, t, type_t="timestep")[:, :1])


def test_the_census_sees_what_it_claims():
    """The census can fail: every kind of read it claims to count is counted, with its line."""
    x = torch.ones(4)
    mask = x > 0
    with SyncCensus() as census:
        census.label = "reads"
        x[0].item(), bool(x[0]), int(x[0]), float(x[0]), x.tolist(), x.cpu(), x.numpy(), x.nonzero()
        census.label = "data-sized"
        x[mask], torch.nonzero(x), torch.where(mask), x.masked_select(mask), torch.unique(x)
        x[mask] = 2.0
        census.label = "host-to-device"
        torch.tensor(1.0, device=x.device)
        census.label = "free"
        torch.where(mask, x, 0.0), x.sum(), torch.tensor(1.0), x[1:], x[torch.tensor([0, 2])]
    assert census.count("reads") == 8 and census.count("data-sized") == 6 and census.count("host-to-device") == 1
    assert census.count("free") == 0
    assert all(e.where.split(":")[0].endswith("tests/test_syncs.py") for e in census.events)
    assert x.item.__name__ == "item" and "patched" not in repr(torch.Tensor.item)  # restored
