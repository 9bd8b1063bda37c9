"""ddpm-train end to end: the real Hydra configs, a tiny network, synthetic IDX files written by the tests."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ddpm_lightning.errors import ConfigError
from ddpm_lightning.training import train

from conftest import CONF_DIR, TINY_TRAIN, compose_train

REPO = CONF_DIR.parent


def _weights(ckpt: Path, key: str = "state_dict") -> dict[str, torch.Tensor]:
    """Network weights of a checkpoint: ``state_dict`` (the EMA when EMA is on) or ``current_model_state`` (raw)."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)[key]
    return {k: v for k, v in state.items() if k.startswith("net.")}


def test_default_config_follows_the_paper_and_the_seed():
    cfg = compose_train([])
    assert cfg.model._target_ == "ddpm_lightning.networks.DiffUNetEps"
    assert (cfg.schedule.kind, cfg.schedule.timesteps) == ("linear", 1000)
    assert (cfg.schedule.beta_start, cfg.schedule.beta_end) == (1e-4, 0.02)
    assert cfg.optimizer._partial_ and cfg.optimizer.lr == 1e-4
    assert cfg.trainer.max_epochs == 100
    seed = compose_train(["experiment=seed"])
    assert (seed.data.subset_size, seed.trainer.max_epochs, seed.data.batch_size) == (1000, 5, 32)


def test_short_run_writes_checkpoint_tensorboard_and_pngs(tiny_train_overrides):
    cfg = compose_train([*tiny_train_overrides, "trainer.max_epochs=2"])
    result = train(cfg)
    run = result["run_dir"]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4 and ckpt["epoch"] == 1  # 16 images / batch 8 = 2 steps per epoch
    # the checkpoint is self-describing with plain containers only
    config = ckpt["hyper_parameters"]["config"]
    assert type(config) is dict and config["schedule"]["beta_end"] == 0.02
    assert not any(k.startswith("schedule.") for k in ckpt["state_dict"])  # rebuilt from config["schedule"]
    assert any(k.startswith("net.") for k in ckpt["state_dict"])
    assert result["best_ckpt"] is not None and result["best_ckpt"].is_file()
    for name in ["epoch_000.png", "epoch_001.png", "trajectory_000.png", "trajectory_001.png"]:
        assert (run / "samples" / name).stat().st_size > 100
    events = EventAccumulator(str(run / "tensorboard")).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss_step", "train/loss_epoch", "val/loss"} <= scalars
    assert {f"val/loss_q{q}" for q in range(4)} <= scalars
    assert {"samples", "trajectory"} <= set(events.Tags()["images"])
    assert all(torch.isfinite(torch.tensor(v)) for v in result["metrics"].values())


def test_validation_loss_is_deterministic(tiny_train_overrides, tmp_path):
    """Fixed validation noise and timesteps: the same weights give the same val/loss in two runs."""
    a = train(compose_train([*tiny_train_overrides, "trainer.max_epochs=0", f"run_dir={tmp_path / 'a'}"]))
    b = train(compose_train([*tiny_train_overrides, "trainer.max_epochs=0", f"run_dir={tmp_path / 'b'}"]))
    va = a["trainer"].validate(a["trainer"].lightning_module, datamodule=a["trainer"].datamodule, verbose=False)
    vb = b["trainer"].validate(b["trainer"].lightning_module, datamodule=b["trainer"].datamodule, verbose=False)
    assert va[0]["val/loss"] == vb[0]["val/loss"]


@pytest.mark.slow  # longer than ~3 s on the slower 2-core kind: the full tier only
def test_resume_matches_an_uninterrupted_run(tiny_train_overrides, tmp_path):
    """2 epochs straight == 1 epoch, then resume from last.ckpt for 1 more: same step, raw weights, EMA weights
    and EMA state (the default config has EMA on)."""
    straight = train(compose_train([*tiny_train_overrides, "trainer.max_epochs=2", f"run_dir={tmp_path / 's'}"]))
    first = train(compose_train([*tiny_train_overrides, "trainer.max_epochs=1", f"run_dir={tmp_path / 'r'}"]))
    last = first["last_ckpt"]
    resumed = train(
        compose_train([*tiny_train_overrides, "trainer.max_epochs=2", f"run_dir={tmp_path / 'r'}", f"ckpt_path={last}"])
    )
    assert resumed["trainer"].global_step == straight["trainer"].global_step == 4
    for key in ["state_dict", "current_model_state"]:
        a, b = _weights(straight["last_ckpt"], key), _weights(resumed["last_ckpt"], key)
        assert a.keys() == b.keys() and a
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{key}: {k}")
    ckpt = torch.load(resumed["last_ckpt"], map_location="cpu", weights_only=True)
    assert int(ckpt["averaging_state"]["n_averaged"]) == 4
    ema, raw = _weights(resumed["last_ckpt"]), _weights(resumed["last_ckpt"], "current_model_state")
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)  # the EMA is not the raw weights


def hparams_of_run(tensorboard_dir: Path) -> tuple[dict, list[str], dict[str, float]]:
    """What TensorBoard's HParams plugin reads from one run folder: the session's hyperparameters, the declared
    metric columns, and the latest value of each ``hp/*`` scalar."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2

    data = {}
    for events in sorted(tensorboard_dir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(events)).Load():
            for value in event.summary.value if event.HasField("summary") else []:
                if value.metadata.plugin_data.plugin_name == "hparams":
                    data[value.tag] = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
    acc = EventAccumulator(str(tensorboard_dir), size_guidance={"scalars": 0})
    acc.Reload()
    start = data["_hparams_/session_start_info"].session_start_info
    params = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    columns = [m.name.tag for m in data["_hparams_/experiment"].experiment.metric_infos]
    values = {tag: acc.Scalars(tag)[-1].value for tag in acc.Tags()["scalars"] if tag.startswith("hp/")}
    return params, columns, values


@pytest.mark.slow
def test_multirun_over_beta_end_writes_three_job_directories(tiny_sweep):
    """The session's sweep (conftest.tiny_sweep): three jobs, each its own run, and one HParams row per job in a
    running TensorBoard."""
    sweep = tiny_sweep
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1", "2"]
    seen = []
    for job in jobs:
        ckpt = torch.load(job / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        seen.append(ckpt["hyper_parameters"]["config"]["schedule"]["beta_end"])
        assert (job / "samples" / "epoch_000.png").is_file()
        assert any((job / "tensorboard").glob("events.out.tfevents.*"))
        losses = ckpt["state_dict"]
        assert all(torch.isfinite(v).all() for v in losses.values() if v.is_floating_point())
        # one row per job in TensorBoard's HParams tab: the swept key, the groups, and the final figures
        params, columns, values = hparams_of_run(job / "tensorboard")
        assert params["schedule.beta_end"] == pytest.approx(seen[-1]) and params["model"] == "adm_tiny"
        assert params["seed"] == 0 and params["optimizer.lr"] == pytest.approx(1e-4) and "data.root" not in params
        assert {"hp/val_loss", "hp/fid", "hp/confident_fraction", "hp/normalised_entropy"} <= set(columns)
        metrics = json.loads(next((job / "evaluate").glob("step_*/metrics.json")).read_text())
        assert values["hp/fid"] == pytest.approx(metrics["fid"], rel=1e-6)
        assert values["hp/confident_fraction"] == pytest.approx(metrics["confident_fraction"], rel=1e-6)
        assert {"hp/val_loss", "hp/fid_floor", "hp/inception_score"} <= set(values)
    assert seen == [0.02, 0.1, 0.2]
    rows = hparams_rows_in_a_running_tensorboard(sweep)
    assert sorted(rows) == ["0/tensorboard", "1/tensorboard", "2/tensorboard"]
    assert [rows[job]["schedule.beta_end"] for job in sorted(rows)] == pytest.approx(seen)
    assert all("hp/fid" in row and "hp/val_loss" in row for row in rows.values())


def hparams_rows_in_a_running_tensorboard(logdir: Path) -> dict[str, dict]:
    """Start ``tensorboard --logdir`` on a free localhost port and ask its HParams plugin (the HTTP API the HPARAMS tab
    uses) for its session groups: ``{run: {hparam or metric tag: value}}``."""
    import re
    import subprocess
    import sys
    import time
    import urllib.request

    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline, url, seen = time.monotonic() + 120, None, []
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
            seen.append(line)
            found = re.search(r"(http://127\.0\.0\.1:\d+)/", line)
            url = found.group(1) if found else None
        assert url, "".join(seen)[-2000:]
        request = {
            "experimentName": "",
            "startIndex": 0,
            "sliceSize": 100,
            "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
            "colParams": [
                {"hparam": "schedule.beta_end"},
                {"metric": {"tag": "hp/fid", "group": ""}},
                {"metric": {"tag": "hp/val_loss", "group": ""}},
            ],
        }
        for _ in range(30):  # TensorBoard loads the event files in the background: ask until all runs are there
            post = urllib.request.Request(
                f"{url}/data/plugin/hparams/session_groups",
                data=json.dumps(request).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(post, timeout=30) as answer:
                groups = json.loads(answer.read())["sessionGroups"]
            rows = {
                g["name"]: {**g["hparams"], **{m["name"]["tag"]: m["value"] for m in g["metricValues"]}} for g in groups
            }
            if len(rows) == 3 and all("hp/fid" in row for row in rows.values()):
                return rows
            time.sleep(2)
        return rows
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("schedule.beta_end=1.5", "schedule.beta_end=1.5 is invalid"),
        ("schedule.timesteps=1e3", "schedule.timesteps=1000.0 is invalid"),
        ("schedule.kind=quadratic", "schedule.kind='quadratic' is invalid"),
        ("data.batch_size=0", "data.batch_size=0 is invalid"),
        ("optimizer.lr=-1", "optimizer.lr=-1 is invalid"),
        ("sampler=ddim", None),  # valid: DDIM-50 for the callback pictures; checked to run below
        ("ckpt_path=/nonexistent/last.ckpt", "ckpt_path='/nonexistent/last.ckpt' is invalid"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(fake_mnist_root, tmp_path, override, needle, run_command):
    if needle is None:
        cfg = compose_train([*TINY_TRAIN, f"data.root={fake_mnist_root}", f"run_dir={tmp_path}", override])
        assert cfg.sampler.steps == 50
        return
    proc = run_command("ddpm-train", [*TINY_TRAIN, f"data.root={fake_mnist_root}", override], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: ") and needle in lines[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("outputs/*/*/checkpoints"))


def test_missing_mnist_fails_before_training_with_the_data_root_hint(tmp_path, run_command):
    proc = run_command("ddpm-train", [*TINY_TRAIN, f"data.root={tmp_path / 'nowhere'}"], cwd=tmp_path)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert "train-images-idx3-ubyte" in last and "data.root" in last
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_one_epoch_on_real_mnist(real_mnist_root, tmp_path):
    """The real IDX files through the real configs (64 images, tiny network)."""
    cfg = compose_train(
        [
            *TINY_TRAIN,
            f"data.root={real_mnist_root}",
            "data.subset_size=64",
            "data.batch_size=32",
            "data.val_size=32",
            f"run_dir={tmp_path}",
        ]
    )
    result = train(cfg)
    assert result["last_ckpt"].is_file()
    assert result["trainer"].datamodule.num_train == 64
    assert 0.0 < result["metrics"]["val/loss"] < 2.0


def test_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tiny_train_overrides, monkeypatch):
    """A NaN loss in epoch 2 stops the run before the optimizer step; last.ckpt stays the finite epoch-1 one."""
    from ddpm_lightning.errors import NonFiniteLossError
    from ddpm_lightning.module import DDPM

    original = DDPM._losses  # per-sample (mse, vb) of training_step

    def poisoned(self, *args, **kwargs):
        mse, vb = original(self, *args, **kwargs)
        return (mse * float("nan") if self.global_step >= 3 else mse), vb

    monkeypatch.setattr(DDPM, "_losses", poisoned)
    cfg = compose_train([*tiny_train_overrides, "trainer.max_epochs=3"])
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss nan at global step 3 \(lr=0.0001\)"):
        train(cfg)
    last = Path(str(cfg.run_dir)) / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2
    for key in ["state_dict", "current_model_state"]:
        assert all(torch.isfinite(v).all() for v in ckpt[key].values() if v.is_floating_point())


@pytest.mark.slow  # longer than ~3 s on the slower 2-core kind: the full tier only
def test_val_fid_is_logged_and_can_pick_the_best_checkpoint(
    tiny_train_overrides, tmp_path, fake_mnist_root, monkeypatch
):
    """callbacks.fid.every_n_epochs=1 logs val/fid from a classifier; a missing classifier stops before training."""
    from ddpm_lightning.classifier import train_classifier

    mine = tmp_path / "cache" / "mnist_classifier.pt"
    fid_overrides = [
        *tiny_train_overrides,
        "callbacks.fid.every_n_epochs=1",
        "callbacks.fid.num_samples=8",
        "callbacks.fid.sampler.steps=2",
    ]
    with pytest.raises(
        ConfigError,
        match=r"^callbacks.fid.classifier_path=.* no such file; train one there with "
        r"ddpm-train-classifier .*, or leave it unset \(null\) for the packaged",
    ):
        train(compose_train([*fid_overrides, f"callbacks.fid.classifier_path={mine}"]))
    assert not (tmp_path / "run" / "checkpoints").exists()
    train_classifier(fake_mnist_root, mine, epochs=1, max_steps=2, verbose=False)
    result = train(
        compose_train(
            [
                *fid_overrides,
                "trainer.max_epochs=2",
                "callbacks.best.monitor=val/fid",
                "callbacks.best.save_on_train_epoch_end=true",
                f"callbacks.fid.classifier_path={mine}",
            ]
        )
    )
    fid = result["metrics"]["val/fid"]
    assert fid > 0 and torch.isfinite(torch.tensor(fid))
    events = EventAccumulator(str(result["tensorboard_dir"])).Reload()
    assert len(events.Scalars("val/fid")) == 2
    assert result["best_ckpt"] is not None and result["best_ckpt"].is_file()
    # the default is the packaged reference classifier: no file of the user's needed
    default = train(compose_train([*fid_overrides, f"run_dir={tmp_path / 'run2'}"]))
    assert torch.isfinite(torch.tensor(default["metrics"]["val/fid"]))


def test_ckpt_path_last_starts_fresh_then_resumes_in_the_same_run_dir(tiny_train_overrides):
    """The same command twice: the first starts fresh, the second (a requeued job) continues from last.ckpt."""
    first = train(compose_train([*tiny_train_overrides, "ckpt_path=last", "trainer.max_epochs=1"]))
    assert first["trainer"].global_step == 2
    second = train(compose_train([*tiny_train_overrides, "ckpt_path=last", "trainer.max_epochs=2"]))
    assert second["trainer"].global_step == 4 and second["run_dir"] == first["run_dir"]


def test_ckpt_path_last_prefers_a_newer_slurm_requeue_checkpoint(tmp_path):
    """On SIGUSR1 Lightning writes <run_dir>/hpc_ckpt_<n>.ckpt (possibly mid-epoch): resume from whichever is newer."""
    import os

    from ddpm_lightning.training import newest_checkpoint, prepare_config

    assert newest_checkpoint(tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    last, hpc = tmp_path / "checkpoints" / "last.ckpt", tmp_path / "hpc_ckpt_1.ckpt"
    last.write_bytes(b"x")
    hpc.write_bytes(b"x")
    os.utime(last, ns=(1_000_000_000, 1_000_000_000))
    os.utime(hpc, ns=(2_000_000_000, 2_000_000_000))
    # the newer file is picked, then checked (these stand-ins are not readable checkpoints)
    with pytest.raises(ConfigError, match=r"ckpt_path='.*hpc_ckpt_1\.ckpt' is invalid: not a readable checkpoint"):
        prepare_config(compose_train([f"run_dir={tmp_path}", "ckpt_path=last"]))
    os.utime(last, ns=(3_000_000_000, 3_000_000_000))
    assert newest_checkpoint(tmp_path) == last


@pytest.mark.slow  # longer than ~3 s on the slower 2-core kind: the full tier only
def test_end_of_run_evaluation_writes_metrics_beside_the_checkpoints(tiny_train_overrides, tmp_path):
    """evaluate={...}: checked before training (a missing classifier or a bad key stops it), then after training
    last.ckpt is sampled and scored into <run_dir>/evaluate/step_<N>/metrics.json."""
    import json

    from ddpm_lightning.classifier import train_classifier

    clf = tmp_path / "clf.pt"
    overrides = [
        *tiny_train_overrides,
        f"evaluate={{num_samples: 6, batch_size: 4, sampler: {{steps: 2}}, classifier_path: {clf}}}",
    ]
    with pytest.raises(ConfigError, match=r"^evaluate.classifier_path="):
        train(compose_train(overrides))
    with pytest.raises(
        ConfigError,
        match=r"^evaluate.num_sample=6 is invalid: no such key; did you mean "
        r"\+\+evaluate.num_samples=6\?$",
    ):
        train(compose_train([*tiny_train_overrides, "evaluate={num_sample: 6}"]))
    assert compose_train([*tiny_train_overrides, "++evaluate.num_samples=6"]).evaluate.num_samples == 6  # it works
    train_classifier(tiny_train_overrides[-2].split("=", 1)[1], clf, epochs=1, max_steps=2, verbose=False)
    with pytest.raises(ConfigError, match=r"^evaluate.sampler.steps=5000 is invalid"):
        train(compose_train([*tiny_train_overrides, f"evaluate={{sampler: {{steps: 5000}}, classifier_path: {clf}}}"]))
    assert not (tmp_path / "run" / "checkpoints").exists()
    result = train(compose_train(overrides))
    metrics_file = tmp_path / "run" / "evaluate" / "step_000002" / "metrics.json"
    metrics = json.loads(metrics_file.read_text())
    assert metrics["n"] == 6 and metrics["ckpt_path"] == str((tmp_path / "run" / "checkpoints" / "last.ckpt").resolve())
    assert result["evaluation"]["fid"] == metrics["fid"]
    assert (
        0 <= metrics["confident_fraction"] <= 1
        and (tmp_path / "run" / "evaluate" / "step_000002" / "samples" / "samples.npz").is_file()
    )


def test_onecycle_lr_scheduler_steps_after_every_optimizer_step_and_is_checkpointed(tiny_train_overrides):
    """lr_scheduler=onecycle: torch's OneCycleLR over trainer.max_steps, stepped once per optimizer step (not per
    epoch): after 4 steps the optimizer's lr equals a reference scheduler stepped 4 times, and last.ckpt holds its
    state so that a resumed run continues the same curve."""
    overrides = [
        *tiny_train_overrides,
        "lr_scheduler=onecycle",
        "trainer.max_epochs=-1",
        "trainer.max_steps=4",
        "optimizer.lr=1e-3",
        "lr_scheduler.total_steps=6",
        "lr_scheduler.pct_start=0.3",
    ]
    result = train(compose_train(overrides))
    ref_opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1e-3)
    ref = torch.optim.lr_scheduler.OneCycleLR(
        ref_opt,
        max_lr=1e-3,
        total_steps=6,
        pct_start=0.3,
        anneal_strategy="cos",
        cycle_momentum=False,
        div_factor=25.0,
        final_div_factor=1e4,
    )
    lrs = [ref_opt.param_groups[0]["lr"]]
    for _ in range(4):
        ref_opt.step()
        ref.step()
        lrs.append(ref_opt.param_groups[0]["lr"])
    assert (
        lrs[0] == pytest.approx(1e-3 / 25) and max(lrs) > 0.9e-3 and lrs[-1] < max(lrs) / 2 and len(set(lrs)) == 5
    )  # warm-up, peak, decay
    assert result["trainer"].optimizers[0].param_groups[0]["lr"] == pytest.approx(lrs[-1], rel=1e-12)
    ckpt = torch.load(result["last_ckpt"], map_location="cpu", weights_only=True)
    assert ckpt["lr_schedulers"][0]["last_epoch"] == 4 and ckpt["global_step"] == 4


def test_lr_scheduler_without_a_step_budget_is_one_line_before_training(tiny_train_overrides, tmp_path):
    with pytest.raises(ConfigError, match=r"^lr_scheduler.total_steps=-1 is invalid: must be an integer >= 1"):
        train(compose_train([*tiny_train_overrides, "lr_scheduler=onecycle"]))
    with pytest.raises(
        ConfigError, match=r"^lr_scheduler is invalid: cannot build ddpm_lightning.budget.BudgetOneCycleLR: "
    ):
        train(
            compose_train(
                [*tiny_train_overrides, "lr_scheduler=onecycle", "trainer.max_steps=4", "lr_scheduler.pct_start=2"]
            )
        )
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_preset_with_a_step_budget_off_the_validation_interval_still_saves_and_evaluates_its_final_state(
    fake_mnist_root, tmp_path
):
    """experiment=mnist_cpu validates every 1,500 steps; stopped at step 2 (max_steps, or max_time on a slow machine)
    it must still write last.ckpt at that step, which the end-of-run evaluation then scores. Before, last.ckpt was
    written only at validation ends, and the evaluation failed with 'no such checkpoint file'."""
    import json

    result = train(
        compose_train(
            [
                "experiment=mnist_cpu",
                "model=adm_tiny",
                "data.batch_size=8",  # not the preset's 64 or 128: seconds more and no assertion
                f"data.root={fake_mnist_root}",
                "data.val_size=8",
                "trainer.max_steps=2",
                "trainer.enable_progress_bar=false",
                "sampler.steps=3",
                "callbacks.samples.num_samples=4",
                "evaluate.num_samples=8",
                "evaluate.sampler.steps=3",
                f"run_dir={tmp_path / 'run'}",
            ]
        )
    )
    assert torch.load(result["last_ckpt"], map_location="cpu", weights_only=True)["global_step"] == 2
    metrics = json.loads((tmp_path / "run" / "evaluate" / "step_000002" / "metrics.json").read_text())
    assert metrics["n"] == 8 and metrics["classifier_reference"] is True


@pytest.mark.parametrize("experiment", ["mnist_cpu", "mnist_cpu_cfg"])
@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmpp", "sde_dpmpp"])
def test_the_presets_take_any_sampler(experiment, sampler):
    """The presets choose their sampler as a group option (sampler=sde_dpmpp) and set no sampler keys of their own, so
    that sampler=<other> on their command line builds that sampler (before, the preset's algorithm or eta followed
    into it: 'unexpected keyword argument')."""
    from hydra.utils import instantiate

    cfg = compose_train([f"experiment={experiment}", f"sampler={sampler}"])
    built = instantiate(cfg.sampler)
    assert type(built).__name__ == {"ddim": "DDIMSampler", "ddpm": "DDPMSampler"}.get(sampler, "DPMSolverSampler")
    assert getattr(built, "algorithm", None) == {"dpmpp": "dpmsolver++", "sde_dpmpp": "sde-dpmsolver++"}.get(sampler)


@pytest.mark.slow  # longer than ~3 s on the slower 2-core kind: the full tier only
def test_the_guided_preset_draws_rows_of_0_to_9_with_guidance_and_scores_the_requested_labels(
    fake_mnist_root, tmp_path, monkeypatch
):
    """experiment=mnist_cpu_cfg: a class-conditional network; its pictures are guided (the callback hands its
    guidance_scale to the sampling loop) in a 10-column grid, so each row reads 0..9; the end-of-run evaluation is
    guided too and records the scale and the fraction classified as the requested digit."""
    import json

    from PIL import Image

    from ddpm_lightning import callbacks

    seen = []
    real_draw = callbacks.draw_samples

    def spy(*args, **kwargs):
        seen.append(kwargs["guidance_scale"])
        return real_draw(*args, **kwargs)

    monkeypatch.setattr(callbacks, "draw_samples", spy)
    cfg = compose_train(
        [
            "experiment=mnist_cpu_cfg",
            "model=adm_tiny",
            "data.batch_size=8",  # not the preset's 64 or 128: seconds more and no assertion
            f"data.root={fake_mnist_root}",
            "data.val_size=8",
            "trainer.max_steps=2",
            "trainer.enable_progress_bar=false",
            "sampler.steps=3",
            "callbacks.samples.num_samples=20",
            "evaluate.num_samples=10",
            "evaluate.sampler.steps=3",
            f"run_dir={tmp_path / 'run'}",
        ]
    )
    assert cfg.model.num_classes == 10 and cfg.callbacks.samples.guidance_scale == cfg.evaluate.guidance_scale != 1
    result = train(cfg)
    assert seen and set(seen) == {cfg.callbacks.samples.guidance_scale}
    grid = Image.open(tmp_path / "run" / "samples" / "epoch_000.png")
    assert grid.size == (10 * 34 + 2, 2 * 34 + 2)  # 10 columns (0..9) x 2 rows, 2-pixel padding
    metrics = json.loads((tmp_path / "run" / "evaluate" / "step_000002" / "metrics.json").read_text())
    assert metrics["guidance_scale"] == cfg.evaluate.guidance_scale and 0 <= metrics["label_accuracy"] <= 1
    assert result["metrics"]["label_accuracy"] == pytest.approx(metrics["label_accuracy"])


def test_a_checkpoint_from_before_the_diffusion_node_still_samples_and_resumes(tiny_run, session_mnist_root, tmp_path):
    """Checkpoints written before conf/diffusion/ store label_dropout and min_snr_gamma at the top of their config and
    no diffusion node: they load and sample as before, and a run resumes from them."""
    from ddpm_lightning.checkpoint import load_ddpm

    from conftest import TINY_CKPT_TRAIN

    ckpt = torch.load(tiny_run["last_ckpt"], map_location="cpu", weights_only=True)
    config = ckpt["hyper_parameters"]["config"]
    config.update(config.pop("diffusion"))  # the old layout
    assert "diffusion" not in config and config["label_dropout"] == 0.1 and config["min_snr_gamma"] is None
    old = tmp_path / "old" / "checkpoints" / "last.ckpt"
    old.parent.mkdir(parents=True)
    torch.save(ckpt, old)
    model = load_ddpm(old)
    x0 = model.sample(2, generator=torch.Generator().manual_seed(0)).x0  # with the run's own sampler (DDIM-3)
    assert x0.shape == (2, 1, 32, 32) and torch.isfinite(x0).all()
    resumed = train(
        compose_train(
            [
                *TINY_CKPT_TRAIN,
                f"data.root={session_mnist_root}",
                f"run_dir={tmp_path / 'resumed'}",
                f"ckpt_path={old}",
                "trainer.max_epochs=2",
            ]
        )
    )
    assert (
        resumed["trainer"].current_epoch == 2 and resumed["trainer"].global_step == 2 * tiny_run["trainer"].global_step
    )


def test_every_log_line_is_printed_once_and_no_advertisement(tiny_train_overrides, tmp_path, run_command):
    """Lightning's own console handler and Hydra's root logger both printed every INFO line; Lightning 2.6.6 adds a
    litlogger tip. Now each line once (Hydra's format, also in <run>/train.log) and no tip. (The installed wheel's
    real process is checked for the same and for torch's pytree FutureWarning in test_package.py.)"""
    proc = run_command("ddpm-train", [*tiny_train_overrides, f"hydra.run.dir={tmp_path / 'hydra'}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    lines = [line for line in out.splitlines() if "[INFO]" in line or line.startswith("INFO:")]
    assert lines and all(not line.startswith("INFO:") for line in lines), out[-3000:]
    messages = [line.split("[INFO] ", 1)[1] for line in lines]
    assert len(messages) == len(set(messages)), out[-3000:]
    assert any(m.startswith("[samples] epoch 0: drawing") for m in messages)
    assert "litlogger" not in out and "Tip:" not in out
    assert "[samples] epoch 0: drawing" in (tmp_path / "hydra" / "train.log").read_text()


@pytest.mark.slow  # longer than ~3 s on the slower 2-core kind: the full tier only
def test_the_progress_bar_writes_each_redraw_once(tiny_train_overrides, tmp_path, run_command):
    """The bar is redrawn every trainer.log_every_n_steps steps with the step count and the loss in one write: it
    used to write the new count with the old loss, then again with the new loss, two lines per redraw in a log file
    (seen in a 30-minute run's log, issue 29)."""
    overrides = [o for o in tiny_train_overrides if not o.startswith(("trainer.enable_progress_bar", "data.subset"))]
    proc = run_command(
        "ddpm-train",
        [*overrides, "data.subset_size=32", "trainer.enable_progress_bar=true", f"hydra.run.dir={tmp_path / 'h'}"],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    states = re.findall(r"Epoch 0:[^\n]*?\| (\d+)/4 \[", (proc.stdout + proc.stderr).replace("\r", "\n"))
    counts = [int(n) for n in states if n != "0"]
    assert counts[:4] == [1, 2, 3, 4], proc.stdout[-3000:]
    assert counts.count(1) == counts.count(2) == counts.count(3) == 1, proc.stdout[-3000:]
