"""ddpm-sample and checkpoint loading: the session's tiny checkpoints (conftest.py), the real conf/sample.yaml."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_lightning import sampling
from ddpm_lightning.checkpoint import load_checkpoint, load_ddpm
from ddpm_lightning.cli import sample as sample_module
from ddpm_lightning.errors import ConfigError
from ddpm_lightning.samplers import DDIMSampler

from conftest import TINY_T as T
from mnist_fixtures import write_fake_mnist

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def _compose(name: str, overrides: list[str]):
    from ddpm_lightning.config import compose_config

    return compose_config(name, overrides)  # as the command composes (one-line errors for bad keys and types)


@pytest.fixture
def trained(tiny_run) -> dict:
    """The session's tiny run (conftest.tiny_run): T = 50, the run's sampler DDIM-3, 2 steps."""
    return tiny_run


@pytest.fixture
def ckpt(tiny_ckpt) -> Path:
    return tiny_ckpt


def _sample_cfg(ckpt: Path, out_dir: Path, *overrides: str):
    return _compose("sample", [f"ckpt_path={ckpt}", f"out_dir={out_dir}", "sampler.steps=3", *overrides])


def _arr(path: Path) -> np.ndarray:
    with np.load(path) as f:
        assert f.files == ["arr_0"]
        return f["arr_0"]


# ------------------------------------------------------------------------------------------ checkpoint loading
def test_load_ddpm_roundtrip(trained, ckpt):
    model = load_ddpm(ckpt, use_ema=True)  # after fit the module holds the EMA weights (EMA is on by default)
    trained_state = trained["trainer"].lightning_module.state_dict()
    state = model.state_dict()
    assert state.keys() == trained_state.keys()
    for k, v in trained_state.items():
        assert torch.equal(state[k], v.cpu()), k
    assert not model.training and not any(m.training for m in model.modules())
    assert model.device.type == "cpu"
    # rebuilt from the stored config, not from defaults
    assert model.schedule.num_timesteps == T
    assert isinstance(model.sampler, DDIMSampler) and model.sampler.steps == 3
    assert model.hparams["config"] == load_checkpoint(ckpt)["hyper_parameters"]["config"]


def test_use_ema_loads_ema_weights_or_warns(ckpt, tmp_path, caplog):
    """Lightning's WeightAveraging layout: state_dict = EMA, current_model_state = raw weights."""
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    raw.pop("averaging_state", None)
    raw_state = raw.pop("current_model_state")
    no_ema = tmp_path / "no_ema.ckpt"
    torch.save({**raw, "state_dict": raw_state}, no_ema)
    ema_state = {k: v + 1.0 if (v.is_floating_point() and k.startswith("net.")) else v for k, v in raw_state.items()}
    path = tmp_path / "ema.ckpt"
    torch.save({**raw, "state_dict": ema_state, "current_model_state": raw_state}, path)
    loaded = load_ddpm(path, use_ema=True).state_dict()
    assert all(torch.equal(loaded[k], ema_state[k]) for k in ema_state if k.startswith("net."))
    plain = load_ddpm(path).state_dict()  # use_ema=False: the raw weights
    assert all(torch.equal(plain[k], raw_state[k]) for k in raw_state if k.startswith("net."))
    with caplog.at_level("WARNING"):
        fallback = load_ddpm(no_ema, use_ema=True).state_dict()
    assert all(torch.equal(fallback[k], raw_state[k]) for k in raw_state if k.startswith("net."))
    assert "without EMA" in caplog.text and "raw" in caplog.text
    for ckpt_path, use_ema, used in [(path, "true", True), (path, "false", False), (no_ema, "true", False)]:
        result = sample_module.sample(
            _sample_cfg(
                ckpt_path, tmp_path / f"out_{used}_{use_ema}_{ckpt_path.stem}", "num_samples=1", f"use_ema={use_ema}"
            )
        )
        assert result["used_ema"] is used, (ckpt_path.name, use_ema)  # what the output line says: EMA or raw weights


_UNPICKLED = []


def _side_effect() -> _Evil:
    _UNPICKLED.append(True)
    return _Evil()


class _Evil:
    """An arbitrary object: unpickling it would run ``_side_effect`` (as a malicious file would run code)."""

    def __reduce__(self):
        return (_side_effect, ())


def _one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_weights_only_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"config": {}}, "x": _Evil()}, path)
    with pytest.raises(ConfigError) as excinfo:
        load_checkpoint(path)
    msg = _one_line_error(excinfo)
    assert str(path) in msg and "not a readable checkpoint" in msg and "UnpicklingError" in msg
    assert not _UNPICKLED  # nothing was executed
    with pytest.raises(ConfigError):
        load_ddpm(path)


@pytest.mark.parametrize("kind", ["truncated", "garbage", "empty"])
def test_unreadable_file_is_a_config_error(ckpt, tmp_path, kind):
    path = tmp_path / f"{kind}.ckpt"
    data = ckpt.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": os.urandom(4096), "empty": b""}[kind])
    with pytest.raises(ConfigError) as excinfo:
        load_ddpm(path)
    msg = _one_line_error(excinfo)
    assert msg.startswith(f"ckpt_path='{path}' is invalid: not a readable checkpoint")
    assert "Error" in msg  # the original error class is named


def test_missing_and_foreign_checkpoints(tmp_path):
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(ConfigError, match="no such checkpoint file") as excinfo:
        load_checkpoint(missing)
    assert _one_line_error(excinfo) == f"ckpt_path='{missing}' is invalid: no such checkpoint file"
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hyper_parameters": {"lr": 0.1}}, foreign)
    with pytest.raises(ConfigError, match="not written by ddpm-train") as excinfo:
        load_ddpm(foreign)
    assert str(foreign) in _one_line_error(excinfo)


# ------------------------------------------------------------------------------------------------- sampling
def test_sample_writes_npz_grid_and_trajectory(ckpt, tmp_path):
    """5 samples in batches of 2 (the last one smaller), with the trajectory pictures."""
    out = tmp_path / "out"
    cfg = _sample_cfg(
        ckpt,
        out,
        "num_samples=5",
        "batch_size=2",
        "sampler.steps=4",
        "trajectory=true",
        "trajectory_frames=3",
        "use_ema=false",
    )
    result = sample_module.sample(cfg)
    arr = _arr(out / "samples.npz")
    assert arr.shape == (5, 32, 32, 1) and arr.dtype == np.uint8
    assert result["samples"] == out / "samples.npz" and result["num_samples"] == 5
    with Image.open(out / "grid.png") as grid:
        grid.load()
        assert grid.size == (3 * 34 + 2, 2 * 34 + 2)  # ceil(sqrt(5)) = 3 per row, 2 px padding
    # 4 DDIM steps, a frame every 4 // (3 - 1) = 2 steps: x_T, after step 2, x0
    assert result["num_frames"] == 3
    with Image.open(result["trajectory_png"]) as traj:
        assert traj.size == (3 * 34 + 2, 5 * 34 + 2)  # rows = min(8, 5) samples, columns = frames
    with Image.open(result["trajectory_gif"]) as gif:
        assert gif.is_animated and gif.n_frames == result["num_frames"]
        assert gif.info["loop"] == 0 and gif.info["duration"] == 100
        gif.seek(gif.n_frames - 1)
        last = np.asarray(gif.convert("L"))
    # the last GIF frame is the grid of the final samples (first 5 of them, 3 per row)
    assert np.array_equal(last[2:34, 2:34], arr[0, :, :, 0])
    assert np.array_equal(last[2:34, 36:68], arr[1, :, :, 0])
    # batch i is seeded with seed + i, independently of the other batches
    alone = sample_module.sample(
        _sample_cfg(ckpt, tmp_path / "alone", "num_samples=2", "batch_size=2", "sampler.steps=4", "use_ema=false")
    )
    assert np.array_equal(_arr(alone["samples"]), arr[:2])
    assert alone["trajectory_png"] is None and not (tmp_path / "alone" / "trajectory.gif").exists()


@pytest.mark.parametrize(
    "sampler",
    [
        pytest.param(["sampler=ddim", "sampler.eta=0.0"], id="ddim_eta0"),
        pytest.param(["sampler=ddim", "sampler.eta=1.0"], id="ddim_eta1"),
        # all T = 50 steps: ~5 s on the slower 2-core kind, the full tier only
        pytest.param(["sampler=ddpm", "sampler.steps=null"], id="ddpm_all_T_steps", marks=pytest.mark.slow),
    ],
)
def test_same_seed_gives_identical_samples(ckpt, tmp_path, sampler):
    common = ["num_samples=3", "batch_size=2", *sampler]
    runs = [
        sample_module.sample(_sample_cfg(ckpt, tmp_path / name, *common, f"seed={seed}"))
        for name, seed in [("a", 7), ("b", 7), ("c", 8)]
    ]
    a, b, c = (_arr(r["samples"]) for r in runs)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    if sampler[0] == "sampler=ddpm":
        assert len(runs[0]["sampler"].timesteps(T)) == T


def test_overwrite_true_replaces_samples(ckpt, tmp_path):
    out = tmp_path / "out"
    sample_module.sample(_sample_cfg(ckpt, out, "num_samples=2", "seed=1", "trajectory=true"))
    first = _arr(out / "samples.npz")
    sample_module.sample(_sample_cfg(ckpt, out, "num_samples=3", "seed=2", "overwrite=true"))
    assert _arr(out / "samples.npz").shape[0] == 3 and not np.array_equal(_arr(out / "samples.npz")[:2], first)
    assert not (out / "trajectory.gif").exists()  # stale pictures of the earlier run are removed


def _not_called(*args, **kwargs):
    raise AssertionError("the network was built before the options were validated")


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["num_samples=0"], "num_samples=0 is invalid"),
        (["batch_size=-1"], "batch_size=-1 is invalid"),
        (["num_samples=1.5"], "num_samples=1.5 is invalid"),
        (["seed=-3"], "seed=-3 is invalid"),
        (["trajectory_frames=1"], "trajectory_frames=1 is invalid"),
        (["device=tpu"], "device='tpu' is invalid"),
        (["ckpt_path=/nonexistent/x.ckpt"], "ckpt_path='/nonexistent/x.ckpt' is invalid: no such checkpoint file"),
        (
            [f"sampler.steps={T + 1}"],
            f"sampler.steps={T + 1} is invalid: must be an integer in [1, {T}] (the schedule's timesteps)",
        ),
        (["sampler=ddpm", f"sampler.steps={T + 1}"], f"sampler.steps={T + 1} is invalid"),
        (["sampler.eta=-1"], "sampler.eta=-1 is invalid"),
        (["existing"], "is invalid: already holds samples.npz; set overwrite=true"),
    ],
)
def test_bad_inputs_fail_before_the_network_is_built(ckpt, tmp_path, monkeypatch, overrides, key):
    out = tmp_path / "out"
    if overrides == ["existing"]:
        out.mkdir()
        (out / "samples.npz").write_bytes(b"earlier samples")
        overrides = []
    monkeypatch.setattr(sampling, "ddpm_from_checkpoint", _not_called)  # validation comes first
    with pytest.raises(ConfigError) as excinfo:
        sample_module.sample(_sample_cfg(ckpt, out, "num_samples=2", *overrides))
    assert key in _one_line_error(excinfo)
    if (out / "samples.npz").exists():
        assert (out / "samples.npz").read_bytes() == b"earlier samples"
    else:
        assert not out.exists()


def test_ckpt_path_is_required(tmp_path):
    cfg = _compose("sample", [f"out_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="ckpt_path is required"):
        sample_module.sample(cfg)


# ------------------------------------------------------------------------------------------------------ CLI
def test_cli_samples_and_refuses_to_overwrite(ckpt, tmp_path, run_command):
    """The command's entry point as the console script runs it (the installed script itself: test_package.py)."""
    out = tmp_path / "cli"
    proc = run_command(
        "ddpm-sample", [f"ckpt_path={ckpt}", "num_samples=2", "sampler.steps=3", f"out_dir={out}"], cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert "images/s" in proc.stdout and "Sampled 2 images with DDIMSampler(steps=3" in proc.stdout
    assert str(out / "samples.npz") in proc.stdout and str(out / "grid.png") in proc.stdout
    assert _arr(out / "samples.npz").shape == (2, 32, 32, 1)
    before = (out / "samples.npz").read_bytes()

    proc = run_command(
        "ddpm-sample",
        [f"ckpt_path={ckpt}", "num_samples=2", "sampler.steps=3", f"out_dir={out}", "seed=5"],
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: out_dir='{out}' is invalid: already holds samples.npz; set overwrite=true to replace it, "
        "or choose another out_dir"
    ]
    assert "Traceback" not in proc.stderr
    assert (out / "samples.npz").read_bytes() == before


def test_class_label_and_guidance_on_a_conditional_checkpoint(conditional_ckpt, tmp_path):
    one = sample_module.sample(
        _sample_cfg(conditional_ckpt, tmp_path / "seven", "num_samples=3", "class_label=7", "guidance_scale=3")
    )
    with np.load(one["samples"]) as f:
        assert f.files == ["arr_0", "arr_1"] and f["arr_0"].shape == (3, 32, 32, 1)
        assert f["arr_1"].tolist() == [7, 7, 7]
    every = sample_module.sample(_sample_cfg(conditional_ckpt, tmp_path / "all", "num_samples=12", "batch_size=5"))
    with np.load(every["samples"]) as f:
        assert f["arr_1"].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]  # all classes in turn across batches


def test_the_guidance_curve_benchmark_scores_each_scale_and_plots(conditional_ckpt, tmp_path, run_script):
    """benchmarks/guidance_curve.py: one ddpm-evaluate per guidance scale, each recording its scale, the label
    accuracy and the entropy, and the plot (not a timed test)."""
    import json

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "guidance_curve.py"
    root = write_fake_mnist(tmp_path / "data", n_train=16, n_test=8)
    out, png = tmp_path / "curve.json", tmp_path / "curve.png"
    proc = run_script(
        script,
        [
            "--ckpt",
            conditional_ckpt,
            "--data-root",
            root,
            "--scales",
            "1",
            "3",
            "--num-samples",
            "10",
            "--batch-size",
            "10",
            "--steps",
            "2",
            "--out",
            out,
            "--plot",
            png,
        ],
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["guidance_scale"] for r in rows] == [1.0, 3.0]
    assert all(0 <= r["label_accuracy"] <= 1 and 0 <= r["normalised_entropy"] <= 1 and r["fid"] > 0 for r in rows)
    assert Image.open(png).size[0] > 0 and "| guidance scale | FID |" in proc.stdout
    png.unlink()  # --replot redraws the plot from the JSON alone
    replot = run_script(script, ["--replot", "--out", out, "--plot", png])
    assert replot.returncode == 0 and png.is_file() and "| 3 |" in replot.stdout, replot.stderr[-2000:]


@pytest.mark.parametrize(
    "override, needle",
    [("class_label=7", "class_label=7 is invalid"), ("guidance_scale=3", "guidance_scale=3.0 is invalid")],
)
def test_conditioning_an_unconditional_checkpoint_is_refused(ckpt, tmp_path, override, needle):
    with pytest.raises(ConfigError, match=needle):
        sample_module.sample(_sample_cfg(ckpt, tmp_path / "out", override))
    assert not (tmp_path / "out" / "samples.npz").exists()


def test_class_label_out_of_range_for_the_checkpoint(conditional_ckpt, tmp_path):
    with pytest.raises(ConfigError, match=r"class_label=10 is invalid: must be in \[0, 9\]"):
        sample_module.sample(_sample_cfg(conditional_ckpt, tmp_path / "out", "class_label=10"))


# ------------------------------------------------------------------------------------------ which sampler runs
def test_by_default_the_checkpoints_own_sampler_runs_and_the_output_says_so(ckpt, tmp_path, capsys):
    """The test run trained with DDIM-3 (eta=0): ddpm-sample's default is that sampler, not conf/sampler/ddim.yaml's
    DDIM-50; a key changes only that key; sampler=ddpm picks another."""
    plain = sample_module.sample(
        _compose("sample", [f"ckpt_path={ckpt}", f"out_dir={tmp_path / 'a'}", "num_samples=2"])
    )
    assert (
        repr(plain["sampler"]) == repr(DDIMSampler(steps=3)) and plain["sampler_source"] == "the checkpoint's sampler"
    )
    assert "DDIMSampler(steps=3, eta=0.0" in capsys.readouterr().out
    keyed = sample_module.sample(
        _compose("sample", [f"ckpt_path={ckpt}", f"out_dir={tmp_path / 'b'}", "num_samples=2", "sampler.eta=1.0"])
    )
    assert repr(keyed["sampler"]) == repr(DDIMSampler(steps=3, eta=1.0))
    assert keyed["sampler_source"] == "the checkpoint's sampler, with eta=1.0"
    other = sample_module.sample(
        _compose(
            "sample",
            [f"ckpt_path={ckpt}", f"out_dir={tmp_path / 'c'}", "num_samples=2", "sampler=ddpm", "sampler.steps=4"],
        )
    )
    assert type(other["sampler"]).__name__ == "DDPMSampler" and other["sampler"].steps == 4
    assert other["sampler_source"] == "chosen on the command line"


def test_sampler_node_merges_keys_into_the_stored_sampler_or_refuses_unknown_ones():
    from ddpm_lightning.config import DEFAULT_SAMPLER_NODE, sampler_node

    marker = {
        "from_checkpoint": True,
        "steps": None,
        "eta": None,
        "timestep_spacing": None,
        "variance": None,
        "clip_denoised": None,
    }
    stored = {
        "_target_": "ddpm_lightning.samplers.DDPMSampler",
        "variance": "fixed_large",
        "clip_denoised": True,
        "steps": 100,
    }
    assert sampler_node(marker, stored) == (stored, "the checkpoint's sampler")
    assert sampler_node(None, stored) == (stored, "the checkpoint's sampler")
    assert sampler_node({**marker, "steps": 10}, stored) == (
        {**stored, "steps": 10},
        "the checkpoint's sampler, with steps=10",
    )
    assert (
        sampler_node({**marker, "steps": 100}, stored)[1] == "the checkpoint's sampler"
    )  # the stored value: no change
    assert sampler_node(marker, None)[0] == DEFAULT_SAMPLER_NODE  # an old checkpoint that stored no sampler
    with pytest.raises(
        ConfigError,
        match=r"^eta=0.5 is invalid: the checkpoint's sampler DDPMSampler has no "
        r"such option; choose another sampler with sampler=ddim, sampler=ddpm, sampler=dpmpp or sampler=sde_dpmpp$",
    ) as err:
        sampler_node({**marker, "eta": 0.5}, stored)
    assert str(err.value.at("sampler")).startswith("sampler.eta=0.5 is invalid: the checkpoint's sampler")  # as printed
