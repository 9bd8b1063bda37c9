"""The GPU speed-ups of issue 26 as config options, checked on the CPU where they run there: model.compile through
nn.Module.compile (checkpoint keys unchanged), the fused Adam, trainer.float32_matmul_precision and cudnn.benchmark in
trainer=gpu / ddp, precision=auto by compute capability (and the non-finite guard with a GradScaler's skipped steps),
the per-epoch grid's fast sampler, and the training images kept on the training device."""

from __future__ import annotations

import pytest
import torch

from ddpm_lightning.errors import ConfigError
from ddpm_lightning.training import prepare_config, resolve_precision, train, trainer_node

from conftest import compose_train


@pytest.mark.parametrize(
    "capability, expected", [((9, 0), "bf16-mixed"), ((8, 0), "bf16-mixed"), ((7, 5), "16-mixed"), ((7, 0), "16-mixed")]
)
def test_precision_auto_is_bf16_only_from_compute_capability_8(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # what V100 and T4 also answer
    assert resolve_precision("auto", "gpu") == expected
    assert resolve_precision("auto", "cpu") == "32-true" and resolve_precision("16-mixed", "gpu") == "16-mixed"


def test_precision_auto_is_fp32_on_a_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_precision("auto", "auto") == "32-true" and resolve_precision("auto", "cpu") == "32-true"


def test_the_gpu_trainers_turn_on_tf32_cudnn_benchmark_and_precision_auto():
    for trainer in ("gpu", "ddp"):
        cfg = compose_train([f"trainer={trainer}", "run_dir=somewhere"])
        assert cfg.trainer.benchmark is True and cfg.trainer.float32_matmul_precision == "high"
        assert cfg.trainer.precision == "auto"
        node, _ = trainer_node(cfg)
        assert "float32_matmul_precision" not in node and node["benchmark"] is True
    cpu = compose_train(["trainer=cpu"])
    assert cpu.trainer.float32_matmul_precision is None and not cpu.trainer.get("benchmark")


def test_strategy_ddp_is_built_with_a_timeout_in_minutes_no_buffer_broadcast_and_bucket_views():
    from datetime import timedelta

    for trainer in ("ddp", "ddp_sim"):
        cfg = compose_train([f"trainer={trainer}", "run_dir=somewhere", "trainer.ddp.timeout_min=3"])
        assert cfg.trainer.strategy == "ddp"
        node, objects = trainer_node(cfg)
        strategy = objects["strategy"]
        assert "strategy" not in node and "ddp" not in node
        assert strategy._timeout == timedelta(minutes=3)
        assert strategy._ddp_kwargs == {
            "broadcast_buffers": False,
            "gradient_as_bucket_view": True,
            "find_unused_parameters": False,
        }
    bad = compose_train(["trainer=ddp_sim", "run_dir=x", "trainer.ddp.timeout_min=0"])
    with pytest.raises(ConfigError, match=r"^trainer.ddp.timeout_min=0 is invalid: must be a finite number of minutes"):
        trainer_node(bad)
    assert trainer_node(compose_train(["run_dir=x"]))[1] == {}  # one device: Lightning's own choice


def test_a_bad_matmul_precision_is_one_line_before_training(tmp_path):
    cfg = compose_train(["trainer.float32_matmul_precision=fast", f"run_dir={tmp_path}"])
    with pytest.raises(
        ConfigError,
        match=r"^trainer.float32_matmul_precision='fast' is invalid: must be one of "
        r"\['highest', 'high', 'medium'\] or null$",
    ):
        prepare_config(cfg)


def test_the_epoch_grid_samples_with_sde_dpm_solver_20_and_ddpm_1000_stays_one_override_away():
    from ddpm_lightning.config import build

    grid = build(compose_train(["run_dir=somewhere"]).callbacks.samples, key="callbacks.samples")
    assert type(grid.sampler).__name__ == "DPMSolverSampler"
    assert (grid.sampler.steps, grid.sampler.algorithm, grid.sampler.order) == (20, "sde-dpmsolver++", 2)
    for over in (["callbacks.samples.sampler=null"], ["experiment=seed", "callbacks.samples.sampler=null"]):
        cfg = compose_train([*over, "run_dir=somewhere"])
        assert build(cfg.callbacks.samples).sampler is None  # the run's sampler: DDPM-1000
        assert cfg.sampler._target_.endswith("DDPMSampler") and cfg.sampler.steps is None
    seed = compose_train(["experiment=seed", "run_dir=somewhere"])
    assert build(seed.callbacks.samples).sampler.steps == 50  # the seed keeps its DDIM-50 pictures
    with pytest.raises(ConfigError, match=r"^callbacks.samples.sampler='ddim' is invalid: must be 'fast'"):
        build(compose_train(["callbacks.samples.sampler=ddim", "run_dir=x"]).callbacks.samples, key="callbacks.samples")


def test_fused_adam_is_an_option_and_steps_like_the_default():
    from ddpm_lightning.config import build

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(3))]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fused = build(compose_train(["optimizer.fused=true"]).optimizer, key="optimizer")(params=params)
    plain = build(compose_train([]).optimizer, key="optimizer")(params=copies)
    assert fused.defaults["fused"] is True and not plain.defaults["fused"]
    for _ in range(3):
        for opt, ps in ((fused, params), (plain, copies)):
            opt.zero_grad()
            sum((p * torch.arange(p.numel()).view_as(p)).sum() for p in ps).backward()
            opt.step()
    for a, b in zip(params, copies, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_grad_scaler_skipped_steps_are_not_non_finite_weights(tiny_train_overrides, monkeypatch):
    """16-mixed with a GradScaler whose scale overflows the fp16 gradients: the scaler skips those steps (inf
    gradients, weights untouched) and halves its scale; the guard sees finite losses and weights and lets the run
    finish. (On a CPU Lightning turns 16-mixed into bf16, so the test builds the fp16 plugin itself.)"""
    from lightning.pytorch.plugins.precision import MixedPrecision

    from ddpm_lightning import training

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)
    original = training.build

    def build(node, key=None, **kwargs):
        if key == "trainer":
            node = {**node, "plugins": [*node["plugins"], MixedPrecision("16-mixed", "cpu", scaler=scaler)]}
            node.pop("precision", None)
        return original(node, key=key, **kwargs)

    monkeypatch.setattr(training, "build", build)
    cfg = compose_train([*tiny_train_overrides, "trainer.max_epochs=2", "callbacks.ema.decay=0.5"])
    result = train(cfg)
    assert result["trainer"].global_step == 4 and scaler.get_scale() < 2.0**100  # steps were skipped
    ckpt = torch.load(result["last_ckpt"], map_location="cpu", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_on_device_images_give_the_same_batches_in_the_same_order(fake_mnist_root):
    """data.on_device=true: the same (seed, epoch) shuffle and the same float batches, gathered where the images are;
    the settings that cannot go with it are refused in one line."""
    from ddpm_lightning.data import MNISTDataModule

    host = MNISTDataModule(root=fake_mnist_root, batch_size=5, val_size=8, seed=3)
    device = MNISTDataModule(root=fake_mnist_root, batch_size=5, val_size=8, seed=3, on_device=True)
    for dm in (host, device):
        dm.setup("fit")
    for epoch in (0, 1):
        a, b = host.train_dataloader(), device.train_dataloader()
        a.sampler.set_epoch(epoch)
        b.sampler.set_epoch(epoch)
        batches = list(zip(a, b, strict=True))
        assert len(batches) == 13
        for (xa, ya), (xb, yb) in batches:
            assert torch.equal(xa, xb) and torch.equal(ya, yb) and xb.device == device.training_device()
    for (xa, ya), (xb, yb) in zip(host.val_dataloader(), device.val_dataloader(), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    for bad in ({"num_workers": 1}, {"pin_memory": True}):
        with pytest.raises(ConfigError, match=r"^on_device=True is invalid: needs num_workers=0 and pin_memory=false"):
            MNISTDataModule(root=fake_mnist_root, on_device=True, **bad)


@pytest.mark.slow  # longer than ~3 s on the slower 2-core kind: the full tier only
def test_a_run_with_on_device_images_is_the_run_without(tiny_train_overrides, tmp_path):
    a = train(compose_train([*tiny_train_overrides, f"run_dir={tmp_path / 'a'}"]))
    b = train(compose_train([*tiny_train_overrides, "data.on_device=true", f"run_dir={tmp_path / 'b'}"]))
    sa, sb = (torch.load(r["last_ckpt"], map_location="cpu", weights_only=True)["state_dict"] for r in (a, b))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow
@pytest.mark.slow
def test_model_compile_keeps_the_checkpoint_keys_and_loads_old_checkpoints(tiny_train_overrides, tmp_path, monkeypatch):
    """model.compile=true: nn.Module.compile at fit start (the EMA copy is made before, uncompiled); the checkpoint
    has the keys of an uncompiled run (no _orig_mod.), an uncompiled checkpoint resumes with compile on, and the
    resume check lets model.compile differ. Dynamo traces with its eager backend here: the keys and the resume do not
    depend on the backend, and inductor's C++ build takes a minute of this CPU (benchmarks/gpu_check.sh compiles for
    real on a GPU)."""
    from ddpm_lightning.checkpoint import load_ddpm

    compile_ = torch.nn.Module.compile
    monkeypatch.setattr(
        torch.nn.Module, "compile", lambda self, *a, **k: compile_(self, *a, **{**k, "backend": "eager"})
    )

    plain = train(compose_train([*tiny_train_overrides, f"run_dir={tmp_path / 'plain'}"]))
    compiled = train(compose_train([*tiny_train_overrides, "model.compile=true", f"run_dir={tmp_path / 'c'}"]))
    assert compiled["trainer"].lightning_module.net._compiled_call_impl is not None
    keys = [
        set(torch.load(r["last_ckpt"], map_location="cpu", weights_only=True)["state_dict"]) for r in (plain, compiled)
    ]
    assert keys[0] == keys[1] and not any("_orig_mod" in k for k in keys[1])
    resumed = train(
        compose_train(
            [
                *tiny_train_overrides,
                "model.compile=true",
                "trainer.max_epochs=2",
                f"run_dir={tmp_path / 'plain'}",
                f"ckpt_path={plain['last_ckpt']}",
            ]
        )
    )
    assert resumed["trainer"].global_step == 4
    assert load_ddpm(compiled["last_ckpt"]).net._compiled_call_impl is None  # loading never compiles


@pytest.mark.slow
# ------------------------------------------------------------------------------------------ DDP over NCCL
def test_sigterm_reaches_the_abort_thread_while_the_main_thread_cannot_run_python(tmp_path):
    """abort_on_sigterm: the C-level handler writes the signal to the wakeup fd and the watcher thread aborts the
    process group (here a stand-in that prints and exits), whatever the main thread does: here it waits in C calls
    and its Python handler does not end it (as a GPU rank in an NCCL wait or a CUDA sync, whose handler cannot run)."""
    import subprocess
    import sys
    import time

    script = tmp_path / "rank.py"
    script.write_text(
        "import os, signal, sys, time\n"
        "from ddpm_lightning import signals\n"
        "signal.signal(signal.SIGTERM, lambda *a: None)  # a Python handler, as Lightning installs one\n"
        "signals._abort_nccl = lambda: (print('aborted', flush=True), os._exit(7))\n"
        "assert signals.abort_on_sigterm(grace_s=0.1)\n"
        "print('ready', flush=True)\n"
        "import ctypes\n"
        "for _ in range(30):\n"
        "    ctypes.CDLL(None).sleep(1)  # waits in C\n"
        "print('main thread went on', flush=True)\n"
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    start = time.monotonic()
    proc.send_signal(15)
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 7 and out.strip() == "aborted" and time.monotonic() - start < 10


def test_the_gloo_group_is_not_aborted_and_no_group_is_a_no_op(monkeypatch):
    import torch.distributed as dist

    from ddpm_lightning import signals

    calls = []
    monkeypatch.setattr(dist.distributed_c10d, "_abort_process_group", lambda *a: calls.append(a))
    signals._abort_nccl()  # no process group
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda *a: "gloo")
    signals._abort_nccl()
    assert calls == []
    monkeypatch.setattr(dist, "get_backend", lambda *a: "nccl")
    signals._abort_nccl()
    assert len(calls) == 1


def test_lightnings_per_step_sigterm_broadcast_is_off():
    import lightning as L

    from ddpm_lightning import signals

    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    signals.skip_sigterm_broadcast(trainer)
    assert trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor() is None


def test_the_slurm_launcher_ends_the_step_when_a_task_dies():
    """srun --kill-on-bad-exit through its environment variable, in the job script before submitit's srun line
    (sbatch refuses --kill-on-bad-exit as an #SBATCH option: it is srun's)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir

    from conftest import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "trainer=ddp"], return_hydra_config=True)
    assert "export SLURM_KILL_BAD_EXIT=1" in list(cfg.hydra.launcher.setup)
    assert "kill-on-bad-exit" not in str(cfg.hydra.launcher.additional_parameters)
