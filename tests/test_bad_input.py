"""Issue #6: every bad input is refused before any work, with one line naming the key, the value and what is
allowed; checkpoints are read safely and written atomically; outputs are never clobbered.

``TRAIN_BAD_INPUTS`` is the table of bad ``ddpm-train`` overrides (the same checks guard ``ddpm-sample`` and
``ddpm-evaluate``: see test_sample.py / test_metrics.py). ``python tests/test_bad_input.py`` prints it with the
message each one produces.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ddpm_lightning.checkpoint import AtomicCheckpointIO, load_checkpoint
from ddpm_lightning.config import check_group_choices
from ddpm_lightning.errors import ConfigError, MNISTDataError
from ddpm_lightning.training import train

from conftest import CONF_DIR, TINY_CKPT_TRAIN, TINY_TRAIN, compose_train, run_train_cli

REPO = CONF_DIR.parent

#: (overrides, the start of the one-line message). Run on TINY_TRAIN with the 64-image fake MNIST.
TRAIN_BAD_INPUTS: list[tuple[list[str], str]] = [
    (["schedule.beta_start=0"], "schedule.beta_start=0 is invalid"),
    (["schedule.beta_start=-0.001"], "schedule.beta_start=-0.001 is invalid"),
    (["schedule.beta_end=1"], "schedule.beta_end=1 is invalid"),
    (["schedule.beta_end=1.5"], "schedule.beta_end=1.5 is invalid"),
    (["schedule.beta_start=0.05"], "schedule.beta_start=0.05 is invalid"),  # > beta_end=0.02
    (["schedule.beta_start=abc"], "schedule.beta_start='abc' is invalid: must be in (0, 1)"),
    (["schedule.timesteps=0"], "schedule.timesteps=0 is invalid"),
    (["schedule.timesteps=1e3"], "schedule.timesteps=1000.0 is invalid"),
    (["schedule.timesteps=true"], "schedule.timesteps=True is invalid"),
    (["schedule.kind=quadratic"], "schedule.kind='quadratic' is invalid"),
    (["sampler.variance=huge"], "sampler.variance='huge' is invalid"),
    (["sampler=ddim", "sampler.steps=1001"], "sampler.steps=1001 is invalid"),
    (["sampler=ddim", "sampler.eta=-1"], "sampler.eta=-1 is invalid"),
    (["sampler=ddim", "sampler.timestep_spacing=even"], "sampler.timestep_spacing='even' is invalid"),
    (["sampler=dpmpp", "sampler.order=3"], "sampler.order=3 is invalid: must be 1 or 2"),
    (["sampler=dpmpp", "sampler.steps=0"], "sampler.steps=0 is invalid: must be a positive integer"),
    (["schedule=sigmoid", "schedule.sigmoid_tau=0"], "schedule.sigmoid_tau=0 is invalid: must be a number > 0"),
    (
        ["schedule=sigmoid", "schedule.sigmoid_start=5"],
        "schedule.sigmoid_start=5 is invalid: must be < sigmoid_end=3.0",
    ),
    (
        ["schedule.rescale_zero_terminal_snr=maybe"],
        "schedule.rescale_zero_terminal_snr='maybe' is invalid: must be true or false",
    ),
    (
        ["schedule.rescale_zero_terminal_snr=true"],
        "diffusion.objective='eps' is invalid: schedule.rescale_zero_terminal_snr=true needs",
    ),
    (["diffusion.objective=noise"], "diffusion.objective='noise' is invalid: must be one of ['eps', 'x0', 'v']"),
    (["callbacks.samples.sampler.steps=2000"], "callbacks.samples.sampler.steps=2000 is invalid"),
    (["callbacks.samples.num_samples=0"], "callbacks.samples.num_samples=0 is invalid"),
    (
        ["++callbacks.samples.guidance_scale=inf"],
        "callbacks.samples.guidance_scale=inf is invalid: must be a finite number",
    ),
    (
        ["++callbacks.samples.guidance_scale=3"],
        "callbacks.samples.guidance_scale=3.0 is invalid: the model is unconditional",
    ),
    (["+callbacks.fid.sampler.eta=-1"], "callbacks.fid.sampler.eta=-1 is invalid: must be a finite number >= 0"),
    (["callbacks.fid.sampler.steps=0"], "callbacks.fid.sampler.steps=0 is invalid: must be a positive integer"),
    (
        ["callbacks.fid.sampler.steps=2000"],
        "callbacks.fid.sampler.steps=2000 is invalid: must be an integer in [1, 1000]",
    ),
    (["callbacks.ema.update_every_n_steps=0"], "callbacks.ema.update_every_n_steps=0 is invalid"),
    (["data.subset_size=0"], "data.subset_size=0 is invalid"),
    (["data.subset_size=-5"], "data.subset_size=-5 is invalid"),
    (["data.subset_size=100"], "data.subset_size=100 is invalid"),  # the fake MNIST has 64 training images
    (["data.subset_size=1.5"], "data.subset_size=1.5 is invalid"),
    (["data.batch_size=0"], "data.batch_size=0 is invalid"),
    (["data.val_size=0"], "data.val_size=0 is invalid"),
    (["optimizer.lr=0"], "optimizer.lr=0 is invalid"),
    (["optimizer.lr=-1"], "optimizer.lr=-1 is invalid"),
    (["optimizer.lr=fast"], "optimizer.lr='fast' is invalid"),
    (["optimizer.lr=inf"], "optimizer.lr=inf is invalid: must be a finite number > 0"),
    (["optimizer.lr=nan"], "optimizer.lr=nan is invalid: must be a finite number > 0"),
    (["optimizer.weight_decay=-1"], "optimizer.weight_decay=-1 is invalid: must be a finite number >= 0"),
    (
        ["trainer.gradient_clip_val=inf"],
        "trainer.gradient_clip_val=inf is invalid: must be a finite number >= 0 or null",
    ),
    (
        ["lr_scheduler=onecycle", "trainer.max_steps=10", "lr_scheduler.max_lr=inf"],
        "lr_scheduler.max_lr=inf is invalid",
    ),
    (["seed=-1"], "seed=-1 is invalid"),
    (["diffusion.label_dropout=1.5"], "diffusion.label_dropout=1.5 is invalid"),
    (["diffusion.min_snr_gamma=0"], "diffusion.min_snr_gamma=0 is invalid"),
    (["callbacks.ema.decay=1.0"], "callbacks.ema.decay=1.0 is invalid"),
    (["model.num_classes=0"], "model.num_classes=0 is invalid"),
    (["+model.patch_size=3"], "model.patch_size=3 is invalid"),
    (["trainer.val_check_interval=3"], "trainer.val_check_interval=3 is invalid: must be <= 2"),  # 16 images, batch 8
    (["lr_scheduler=onecycle"], "lr_scheduler.total_steps=-1 is invalid"),  # no trainer.max_steps budget
    (
        ["lr_scheduler=onecycle", "trainer.max_steps=20"],  # OneCycleLR: a warm-up of 0.05 x 20 - 1 = 0 steps
        "lr_scheduler.total_steps=20 is invalid: ddpm_lightning.budget.BudgetOneCycleLR cannot run 20 steps "
        "(ZeroDivisionError: float division by zero); choose another trainer.max_steps",
    ),
    (["trainer.precision=bf17"], "trainer is invalid: cannot build lightning.Trainer"),
    (["ckpt_path=/nonexistent/last.ckpt"], "ckpt_path='/nonexistent/last.ckpt' is invalid: no such checkpoint file"),
    (["overwrite=maybe"], "overwrite='maybe' is invalid"),
    (["diffusion.loss=kl"], "diffusion.loss='kl' is invalid: must be one of ['simple', 'hybrid', 'vlb']"),
    (["diffusion.loss=hybrid"], "diffusion.loss='hybrid' is invalid: needs model.learn_sigma=true"),
    (["diffusion.loss=vlb", "diffusion.min_snr_gamma=5"], "diffusion.loss='vlb' is invalid: has no MSE term"),
    (["diffusion.vlb_weight=0"], "diffusion.vlb_weight=0 is invalid: must be a finite number > 0"),
    (["diffusion.vlb_weight=inf"], "diffusion.vlb_weight=inf is invalid: must be a finite number > 0"),
    (["diffusion.timestep_sampler=importance"], "diffusion.timestep_sampler='importance' is invalid: must be one of"),
    (["model.learn_sigma=maybe"], "model.learn_sigma='maybe' is invalid: must be true"),
    (["sampler.variance=learned"], "sampler.variance='learned' is invalid: the model has no variance output"),
    (["callbacks.bpd.num_images=0"], "callbacks.bpd.num_images=0 is invalid"),
    (
        ["callbacks.bpd.every_n_epochs=1", "callbacks.bpd.num_images=9"],
        "callbacks.bpd.num_images=9 is invalid: must be <= data.val_size=8",
    ),
    (["++evaluate.nll=true", "++evaluate.nll_n=1"], "evaluate.nll_n=1 is invalid"),
    (["++evaluate.guidance_scale=3"], "evaluate.guidance_scale=3.0 is invalid: the model is unconditional"),
    # the hints of TYPO_INPUTS for a real option that the YAML does not list, followed (issue #28)
    (
        ["+callbacks.samples.guidance_scale=3"],
        "callbacks.samples.guidance_scale=3.0 is invalid: the model is unconditional",
    ),
    (
        ["experiment=mnist_cpu", "+evaluate.guidance_scale=2"],
        "evaluate.guidance_scale=2.0 is invalid: the model is unconditional",
    ),
    (
        ["sampler=dpmpp", "sampler.timestep_spacing=linspace", "sampler.steps=1000"],
        "sampler.steps=1000 is invalid: must be an integer in [1, 999] with timestep_spacing='linspace', which spaces "
        "steps + 1 points",
    ),
    (
        ["++evaluate.nll=true", "++evaluate.nll_variance=learned"],
        "evaluate.nll_variance='learned' is invalid: the model has no variance output",
    ),
    (
        ["++evaluate.nll=true", "++evaluate.nll_variance=wide"],
        "evaluate.nll_variance='wide' is invalid: must be null or one of",
    ),
]


def _one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text, text
    return text


def _run_dir_untouched(run_dir: Path) -> bool:
    return (
        not (run_dir / "checkpoints").exists()
        and not (run_dir / "tensorboard").exists()
        and not (run_dir / "samples").exists()
    )


@pytest.mark.parametrize("overrides, message", TRAIN_BAD_INPUTS, ids=[" ".join(o) for o, _ in TRAIN_BAD_INPUTS])
def test_bad_train_input_is_one_line_before_any_work(tiny_train_overrides, tmp_path, overrides, message):
    with pytest.raises((ConfigError, MNISTDataError)) as excinfo:
        train(compose_train([*tiny_train_overrides, *overrides]))
    assert _one_line(excinfo.value).startswith(message), str(excinfo.value)
    assert _run_dir_untouched(tmp_path / "run")


@pytest.mark.slow
def test_cli_prints_the_line_and_exits_2_without_traceback(fake_mnist_root, tmp_path):
    """The one real interpreter behind the in-process command tests: the line, exit status 2, no traceback."""
    proc = run_train_cli([*TINY_TRAIN, f"data.root={fake_mnist_root}", "schedule.beta_start=0.05"], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: schedule.beta_start=0.05 is invalid"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("outputs/*/*/checkpoints"))


@pytest.mark.parametrize(
    "args, message",
    [
        (["sampler=dim"], "sampler='dim' is invalid: must be one of ['ddim', 'ddpm', 'dpmpp', 'sde_dpmpp']"),
        (["schedule=quadratic"], "schedule='quadratic' is invalid: must be one of ['cosine', 'linear', 'sigmoid']"),
        (
            ["-m", "model=adm_tiny,adm_smal"],
            "model='adm_smal' is invalid: must be one of ['adm_fast', 'adm_small', 'adm_tiny', 'diffunet']",
        ),
        (["experiment=mnist_gpu"], "experiment='mnist_gpu' is invalid: must be one of ["),
    ],
)
def test_an_unknown_group_option_is_one_line(args, message):
    with pytest.raises(ConfigError) as excinfo:
        check_group_choices(args, CONF_DIR, exclude={"sampler": ["checkpoint"]})  # as ddpm-train checks them
    assert _one_line(excinfo.value).startswith(message)


def test_the_checkpoint_sampler_is_offered_to_ddpm_sample_but_refused_by_ddpm_train(tiny_train_overrides):
    with pytest.raises(ConfigError, match=r"must be one of \['checkpoint', 'ddim', 'ddpm', 'dpmpp', 'sde_dpmpp'\]"):
        check_group_choices(["sampler=dim"], CONF_DIR)
    with pytest.raises(ConfigError, match=r"^sampler='checkpoint' is invalid: only ddpm-sample and ddpm-evaluate"):
        train(compose_train([*tiny_train_overrides, "sampler=checkpoint"]))


#: (command, overrides, the whole one-line message): typo'd keys name the nearest valid key, bad types say the type.
TYPO_INPUTS = [
    (
        "train",
        ["schedule.beta_ed=0.1"],
        "schedule.beta_ed=0.1 is invalid: no such key; did you mean schedule.beta_end=0.1?",
    ),
    ("train", ["trainer.max_step=3"], "trainer.max_step=3 is invalid: no such key; did you mean trainer.max_steps=3?"),
    (
        "train",
        ["label_dropout=0.5"],
        "label_dropout=0.5 is invalid: no such key; did you mean diffusion.label_dropout=0.5?",
    ),
    (
        "train",
        ["-m", "schedule.beta_ends=0.1,0.2"],
        "schedule.beta_ends='0.1,0.2' is invalid: no such key; did you mean schedule.beta_end=0.1,0.2?",
    ),
    ("sample", ["ckpt_path=x", "num_sample=5"], "num_sample=5 is invalid: no such key; did you mean num_samples=5?"),
    ("sample", ["ckpt_path=x", "num_samples=1.5"], "num_samples=1.5 is invalid: must be an integer"),
    ("sample", ["ckpt_path=x", "use_ema=maybe"], "use_ema='maybe' is invalid: must be true or false"),
    (
        "sample",
        ["ckpt_path=x", "sampler.stepz=3"],
        "sampler.stepz=3 is invalid: no such key; did you mean sampler.steps=3?",
    ),
    ("evaluate", ["data.rot=x"], "data.rot='x' is invalid: no such key; did you mean data.root=x?"),
    ("evaluate", ["inception_fid=maybe"], "inception_fid='maybe' is invalid: must be true or false"),
    (
        "train",
        ["evaluate.num_samples=6"],
        "evaluate.num_samples=6 is invalid: evaluate is null in this config; add the key with ++evaluate.num_samples=6",
    ),
    ("train_classifier", ["epoch=2"], "epoch=2 is invalid: no such key; did you mean epochs=2?"),
    # issue #28: a real option of the node's _target_ (or of ddpm-evaluate's schema) that the YAML does not list
    (
        "train",
        ["trainer.max_time=00:00:10:00"],
        "trainer.max_time='00:00:10:00' is invalid: not in this config, but an option of lightning.Trainer; "
        "add it with +trainer.max_time=00:00:10:00",
    ),
    (
        "train",
        ["callbacks.samples.guidance_scale=3"],
        "callbacks.samples.guidance_scale=3 is invalid: not in this config, but an option of "
        "ddpm_lightning.callbacks.SampleCallback; add it with +callbacks.samples.guidance_scale=3",
    ),
    (
        "train",
        ["experiment=mnist_cpu", "evaluate.guidance_scale=2"],
        "evaluate.guidance_scale=2 is invalid: not in this config, but an option of ddpm-evaluate "
        "(conf/evaluate.yaml); add it with +evaluate.guidance_scale=2",
    ),
    (
        "train",
        ["callbacks.fid.sampler.eta=0.5"],
        "callbacks.fid.sampler.eta=0.5 is invalid: not in this config, but an "
        "option of ddpm_lightning.samplers.DDIMSampler; add it with "
        "+callbacks.fid.sampler.eta=0.5",
    ),
    (
        "train",
        ["diffusion.image_shape=[1,28,28]"],
        "diffusion.image_shape=[1, 28, 28] is invalid: not in this config, "
        "but an option of ddpm_lightning.module.DDPM; add it with "
        "+diffusion.image_shape=[1,28,28]",
    ),
    (
        "train",
        ["trainer.max_tme=00:00:10:00"],
        "trainer.max_tme='00:00:10:00' is invalid: no such key; did you mean +trainer.max_time=00:00:10:00?",
    ),
    (
        "train",
        ["-m", "experiment=seed,mnist_cpu", "trainer.max_time=00:00:05:00"],  # mnist_cpu lists it, seed does not
        "trainer.max_time='00:00:05:00' is invalid: not in this config, but an option of lightning.Trainer; "
        "add it with ++trainer.max_time=00:00:05:00",
    ),
]


@pytest.mark.parametrize("command, overrides, message", TYPO_INPUTS, ids=[" ".join(o) for _, o, _ in TYPO_INPUTS])
def test_a_typod_key_or_a_value_of_the_wrong_type_is_one_line_naming_the_nearest_key(command, overrides, message):
    from ddpm_lightning.config import compose_config

    with pytest.raises(ConfigError) as excinfo:
        compose_config(command, overrides)
    assert _one_line(excinfo.value) == message


def _follow_hint(overrides: list[str], message: str) -> list[str] | None:
    """The command line with the hint of ``message`` in place of the override it is about (None: no hint)."""
    import re

    found = re.search(r"(?:did you mean|add it with|add the key with) (\S+?)\??$", message)
    if found is None:
        return None
    bad = message.split(" is invalid: ", 1)[0].split("=", 1)[0]
    return [found[1] if o.lstrip("+").split("=", 1)[0] == bad else o for o in overrides]


@pytest.mark.parametrize(
    "command, overrides, message",
    [r for r in TYPO_INPUTS if _follow_hint(r[1], r[2])],
    ids=[" ".join(o) for _, o, m in TYPO_INPUTS if _follow_hint(o, m)],
)
def test_every_hint_works_in_the_command_that_printed_it(command, overrides, message):
    """Each suggested override of TYPO_INPUTS, put in place of the bad one, composes in the same command (its value
    read back under the suggested key); what training's own checks then say is in TRAIN_BAD_INPUTS."""
    from omegaconf import OmegaConf

    from ddpm_lightning.config import _typed, compose_config

    followed = _follow_hint(overrides, message)
    cfg = compose_config(command, followed)
    hint = next(new for old, new in zip(overrides, followed, strict=True) if old != new)
    key, value = hint.lstrip("+").split("=", 1)
    if "," not in value:  # a sweep's values are the sweeper's
        assert OmegaConf.select(cfg, key) == _typed(value), (key, OmegaConf.select(cfg, key))


@pytest.mark.slow
def test_a_followed_max_time_hint_trains_with_lightnings_timer(tiny_train_overrides):
    """``+trainer.max_time=00:00:10:00`` (the hint for ``trainer.max_time=...``) reaches lightning.Trainer."""
    from lightning.pytorch.callbacks import Timer

    out = train(compose_train([*tiny_train_overrides, "+trainer.max_time=00:00:10:00"]))
    timers = [c for c in out["trainer"].callbacks if isinstance(c, Timer)]
    assert timers and timers[0]._duration == 600


@pytest.mark.slow
def test_cli_hints_for_real_options_work_in_ddpm_train(fake_mnist_root, tmp_path):
    """Through the real ddpm-train: the hint line (exit 2, nothing written), then its command line: training's own
    guidance refusal for callbacks.samples.guidance_scale (exit 2), and a finished run for trainer.max_time."""
    proc = run_train_cli(["callbacks.samples.guidance_scale=3"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and not (tmp_path / "outputs").exists()
    line = proc.stderr.strip()
    assert line == (
        "error: callbacks.samples.guidance_scale=3 is invalid: not in this config, but an option of "
        "ddpm_lightning.callbacks.SampleCallback; add it with +callbacks.samples.guidance_scale=3"
    )
    hint = line.rsplit(" ", 1)[1]
    base = [*TINY_TRAIN, f"data.root={fake_mnist_root}"]
    refused = run_train_cli([*base, f"run_dir={tmp_path / 'a'}", hint], cwd=tmp_path)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert (
        refused.stderr.strip()
        .splitlines()[-1]
        .startswith("error: callbacks.samples.guidance_scale=3.0 is invalid: the model is unconditional")
    )
    assert "Traceback" not in refused.stderr
    proc = run_train_cli(["trainer.max_time=00:00:10:00"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    hint = proc.stderr.strip().rsplit(" ", 1)[1]
    assert hint == "+trainer.max_time=00:00:10:00"
    done = run_train_cli([*base, f"run_dir={tmp_path / 'b'}", hint], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "b" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow  # imports every target (Lightning, deepinv): ~10 s on 2 CPU cores
def test_the_options_read_from_source_are_the_signatures_of_every_target_in_conf():
    """The hints read each ``_target_``'s keyword arguments from its source without importing it
    (ddpm_lightning.targets): for every target named in conf/ (and the nodes of NODE_OWNERS) that reading equals
    ``inspect.signature`` of the imported object (the arguments with a default that can be given by keyword)."""
    import inspect
    import re

    from hydra.utils import get_object

    from ddpm_lightning.config import NODE_OWNERS
    from ddpm_lightning.targets import keyword_arguments

    targets = {
        m
        for f in CONF_DIR.rglob("*.yaml")
        if "hydra" not in f.parts
        for m in re.findall(r"_target_:\s*([\w.]+)", f.read_text())
    }
    targets |= {owner for nodes in NODE_OWNERS.values() for owner, _, _ in nodes.values()}
    assert {"lightning.Trainer", "ddpm_lightning.callbacks.SampleCallback", "torch.optim.Adam"} <= targets
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    for target in sorted(targets):
        signature = inspect.signature(get_object(target))
        expected = [n for n, p in signature.parameters.items() if p.kind in kinds and p.default is not p.empty]
        assert keyword_arguments(target) == tuple(expected), target


def test_the_suggested_key_works_in_the_command_that_printed_it():
    from ddpm_lightning.config import compose_config

    with pytest.raises(ConfigError, match=r"did you mean (\S+)\?$") as excinfo:
        compose_config("train", ["min_snr_gamma=5"])
    suggestion = str(excinfo.value).rsplit("did you mean ", 1)[1].rstrip("?")
    assert compose_config("train", [suggestion]).diffusion.min_snr_gamma == 5


def test_cli_typod_key_exits_2_with_one_line_before_hydra(tmp_path):
    proc = run_train_cli(["trainer.max_step=3"], cwd=tmp_path, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: trainer.max_step=3 is invalid: no such key; did you mean trainer.max_steps=3?"
    assert not (tmp_path / "outputs").exists()


def test_build_gives_nested_nodes_their_key_path():
    from ddpm_lightning.config import build

    node = {
        "_target_": "ddpm_lightning.callbacks.FIDCallback",
        "every_n_epochs": 0,
        "sampler": {"_target_": "ddpm_lightning.samplers.DDIMSampler", "steps": 5, "eta": -1},
    }
    with pytest.raises(ConfigError) as excinfo:
        build(node, key="callbacks.fid")
    assert str(excinfo.value) == "callbacks.fid.sampler.eta=-1 is invalid: must be a finite number >= 0"
    with pytest.raises(ConfigError, match=r"^callbacks\.fid\.num_samples=1 is invalid"):
        build({**node, "num_samples": 1, "sampler": None}, key="callbacks.fid")
    fid = build({**node, "sampler": {**node["sampler"], "eta": 0.5}}, key="callbacks.fid")
    assert type(fid.sampler).__name__ == "DDIMSampler" and fid.sampler.eta == 0.5


def test_known_group_options_and_other_overrides_pass_the_group_check():
    check_group_choices(
        [
            "-m",
            "model=adm_tiny,adm_small",
            "experiment=null",
            "hydra/launcher=slurm",
            "~sampler",
            "+trainer.val_check_interval=5",
            "schedule.kind=linear",
            "sampler=choice(ddim,ddpm)",
        ],
        CONF_DIR,
    )


def test_cli_unknown_group_option_exits_2_before_hydra(tmp_path):
    proc = run_train_cli(["sampler=dim"], cwd=tmp_path, timeout=60)
    assert proc.returncode == 2
    assert (
        proc.stderr.strip() == "error: sampler='dim' is invalid: must be one of ['ddim', 'ddpm', 'dpmpp', 'sde_dpmpp']"
    )
    assert not (tmp_path / "outputs").exists()


# -- checkpoints -------------------------------------------------------------------------------------------------


@pytest.fixture
def trained_run(tiny_run) -> Path:
    """The session's finished 2-step run (conftest.tiny_run: TINY_CKPT_TRAIN, T = 50), its run_dir with
    checkpoints/last.ckpt. Read only."""
    return tiny_run["run_dir"]


@pytest.fixture
def resume(trained_run, session_mnist_root, tmp_path):
    """``resume(*overrides)``: the composed config of a 2-epoch resume from :func:`trained_run` into
    ``tmp_path/resumed``, with the checkpoint's network, schedule and data."""

    def compose(*overrides: str):
        return compose_train(
            [
                *TINY_CKPT_TRAIN,
                f"data.root={session_mnist_root}",
                f"run_dir={tmp_path / 'resumed'}",
                "trainer.max_epochs=2",
                f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}",
                *overrides,
            ]
        )

    return compose


@pytest.mark.parametrize(
    "override, message",
    [
        ("schedule.beta_end=0.03", "schedule.beta_end=0.02 in the checkpoint, 0.03 in the config"),
        ("schedule.timesteps=500", "schedule.timesteps=50 in the checkpoint, 500 in the config"),
        ("model.model_channels=16", "model.model_channels=32 in the checkpoint, 16 in the config"),
        ("model=adm_small", "model.attn_resolutions=[] in the checkpoint, [8] in the config"),
        ("diffusion.objective=v", "diffusion.objective='eps' in the checkpoint, 'v' in the config"),
        ("schedule=sigmoid", "schedule.kind='linear' in the checkpoint, 'sigmoid' in the config"),
    ],
)
def test_resume_with_a_different_network_or_schedule_says_which_differs(resume, tmp_path, override, message):
    with pytest.raises(ConfigError) as excinfo:
        train(resume(override))
    text = _one_line(excinfo.value)
    assert "the checkpoint does not match the config" in text and message in text, text
    assert _run_dir_untouched(tmp_path / "resumed")


def test_resume_with_the_same_network_and_schedule_is_accepted(resume):
    out = train(resume("sampler=ddpm", "data.batch_size=4"))  # sampler/data may change
    assert out["trainer"].current_epoch == 2


class _RunsCode:
    """Unpickling this calls ``open(marker, "w")``: a stand-in for a checkpoint that executes code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("entry", ["train", "sample"])
def test_a_checkpoint_that_would_run_code_is_refused(trained_run, resume, tmp_path, entry):
    marker = tmp_path / "code_ran"
    ckpt = torch.load(trained_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    ckpt["hyper_parameters"]["payload"] = _RunsCode(marker)
    evil = tmp_path / "evil.ckpt"
    torch.save(ckpt, evil)
    with pytest.raises(pickle.UnpicklingError):  # the payload really does run code under plain unpickling
        torch.load(evil, weights_only=True)
    with pytest.raises(ConfigError) as excinfo:
        if entry == "train":
            train(resume(f"ckpt_path={evil}"))
        else:
            from ddpm_lightning.cli.sample import sample
            from ddpm_lightning.config import compose_config

            sample(compose_config("sample", [f"ckpt_path={evil}", f"out_dir={tmp_path / 's'}"]))
    text = _one_line(excinfo.value)
    assert f"ckpt_path='{evil}' is invalid: not a readable checkpoint (torch.load weights_only=True failed" in text
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # control: without weights_only the file does run code
    assert marker.exists()


@pytest.mark.parametrize("kind", ["truncated", "empty", "not_ddpm"])
def test_truncated_or_foreign_resume_checkpoint_is_one_line(trained_run, resume, tmp_path, kind):
    bad = tmp_path / "bad.ckpt"
    good = (trained_run / "checkpoints" / "last.ckpt").read_bytes()
    if kind == "truncated":
        bad.write_bytes(good[: len(good) // 2])
    elif kind == "empty":
        bad.write_bytes(b"")
    else:
        torch.save({"state_dict": {}}, bad)
    with pytest.raises(ConfigError) as excinfo:
        train(resume(f"ckpt_path={bad}"))
    why = "not written by ddpm-train" if kind == "not_ddpm" else "not a readable checkpoint"
    assert _one_line(excinfo.value).startswith(f"ckpt_path='{bad}' is invalid: {why}")


def test_an_interrupted_save_leaves_the_previous_checkpoint(trained_run, tmp_path, monkeypatch):
    """A failure half-way through writing the new checkpoint: the old file keeps its bytes and still loads."""
    last = tmp_path / "last.ckpt"
    last.write_bytes((trained_run / "checkpoints" / "last.ckpt").read_bytes())
    before = last.read_bytes()
    opened: list[Path] = []

    def half_then_fail(obj, f, *args, **kwargs):
        opened.append(Path(f.name))
        f.write(before[: len(before) // 2])
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(OSError, match="simulated"):
        AtomicCheckpointIO().save_checkpoint({"state_dict": {}}, last)
    assert opened and opened[0].parent == last.parent and opened[0] != last  # a temp file beside the target
    assert last.read_bytes() == before
    load_checkpoint(last)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # the temp file is cleaned up


_KILL_DURING_SAVE = """
import os, signal, sys, torch
from ddpm_lightning.checkpoint import AtomicCheckpointIO
real_save = torch.save
def save_half_then_die(obj, f, *a, **k):
    f.write(b"PK" * 1000); f.flush(); os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = save_half_then_die
AtomicCheckpointIO().save_checkpoint({"state_dict": {}}, sys.argv[1])
"""


@pytest.mark.slow
def test_sigkill_during_save_leaves_the_previous_checkpoint(trained_run, tmp_path):
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    last.write_bytes((trained_run / "checkpoints" / "last.ckpt").read_bytes())
    before = last.read_bytes()
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_DURING_SAVE, str(last)],
        capture_output=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert last.read_bytes() == before
    load_checkpoint(last)
    from ddpm_lightning.training import newest_checkpoint

    assert newest_checkpoint(tmp_path) == last  # the leftover hidden temp file is never picked for a resume


def test_training_saves_through_the_atomic_io(tiny_train_overrides, tmp_path, monkeypatch):
    """The default trainer config really routes checkpoint writes through AtomicCheckpointIO."""
    calls: list[str] = []
    original = AtomicCheckpointIO.save_checkpoint

    def spy(self, checkpoint, path, storage_options=None):
        calls.append(Path(path).name)
        return original(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", spy)
    train(compose_train(tiny_train_overrides))
    assert "last.ckpt" in calls


# -- outputs never clobbered ---------------------------------------------------------------------------------------


def test_a_fresh_run_refuses_a_run_dir_with_checkpoints(trained_run, session_mnist_root):
    root = session_mnist_root
    before = (trained_run / "checkpoints" / "last.ckpt").read_bytes()
    with pytest.raises(ConfigError) as excinfo:
        train(compose_train([*TINY_CKPT_TRAIN, f"data.root={root}", f"run_dir={trained_run}"]))
    assert _one_line(excinfo.value).startswith(f"run_dir='{trained_run}' is invalid: already holds")
    assert "overwrite=true" in str(excinfo.value)
    assert (trained_run / "checkpoints" / "last.ckpt").read_bytes() == before


@pytest.mark.slow
def test_two_runs_started_in_the_same_second_get_different_directories(fake_mnist_root, tmp_path):
    """Hydra's run directory carries microseconds: two ddpm-train processes started together write apart."""
    args = [*TINY_TRAIN, f"data.root={fake_mnist_root}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "ddpm_lightning.cli.train", *args],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    runs = sorted(tmp_path.glob("outputs/*/*/checkpoints/last.ckpt"))
    assert len(runs) == 2, runs
    # one process per run: every event file of a run (training's, then the final metrics') carries the same pid
    writers = [
        {f.name.split(".")[-2] for f in r.parent.parent.glob("tensorboard/**/events.out.tfevents.*")} for r in runs
    ]
    assert all(len(w) == 1 for w in writers) and writers[0] != writers[1], writers


# -- fuzz -----------------------------------------------------------------------------------------------------------

#: The validated keys. sampler.steps/eta are fuzzed on DDIM (sampler=ddim is added).
FUZZ_KEYS = [
    "schedule.beta_start",
    "schedule.beta_end",
    "schedule.timesteps",
    "schedule.kind",
    "sampler.steps",
    "sampler.eta",
    "data.batch_size",
    "data.subset_size",
    "data.val_size",
    "optimizer.lr",
    "seed",
    "diffusion.label_dropout",
    "callbacks.samples.num_samples",
    "callbacks.ema.decay",
]
_FUZZ_VALUES = st.one_of(
    st.integers(-5, 1200).map(str),
    st.floats(-2.0, 2.0, allow_nan=False).map(repr),
    st.sampled_from(
        [
            "0",
            "1",
            "1e3",
            "1e-4",
            "0.02",
            "nan",
            "inf",
            "-inf",
            "true",
            "false",
            "null",
            "abc",
            "linear",
            "cosine",
            "''",
            "[1,2]",
            "{a: 1}",
        ]
    ),
)


@pytest.mark.slow
@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(st.dictionaries(st.sampled_from(FUZZ_KEYS), _FUZZ_VALUES, min_size=1, max_size=3))
def test_fuzzed_overrides_train_one_step_or_fail_with_one_line(fake_mnist_root, overrides):
    """Random values for the validated keys: either a 1-step training run or ConfigError/MNISTDataError with one
    line naming a key. Any other exception (a traceback at the command line) fails the test."""
    import tempfile

    pairs = [f"{k}={v}" for k, v in overrides.items()]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_train(
            [
                *TINY_TRAIN,
                f"data.root={fake_mnist_root}",
                f"run_dir={tmp}/run",
                "sampler=ddim",
                "trainer.max_steps=1",
                "callbacks.samples.every_n_epochs=0",
                *pairs,
            ]
        )
        try:
            train(cfg)
        except (ConfigError, MNISTDataError) as err:
            text = _one_line(err)
            assert " is invalid: " in text or text.startswith("data.root"), text
            assert _run_dir_untouched(Path(tmp) / "run"), text


if __name__ == "__main__":  # print the table of bad inputs and their messages (for the docs / closing note)
    import tempfile

    from mnist_fixtures import write_fake_mnist

    with tempfile.TemporaryDirectory() as tmp:
        root = write_fake_mnist(Path(tmp) / "data")
        print("| override | message |\n| --- | --- |")
        for overrides, _ in TRAIN_BAD_INPUTS:
            try:
                train(compose_train([*TINY_TRAIN, f"data.root={root}", f"run_dir={tmp}/run", *overrides]))
                msg = "(accepted!)"
            except (ConfigError, MNISTDataError) as err:
                msg = str(err)
            print(f"| `{' '.join(overrides)}` | `{msg}` |")


# --------------------------------------------------------------------------------------- non-finite weights, one writer
def test_a_checkpoint_with_non_finite_weights_is_never_written(tmp_path):
    from ddpm_lightning.errors import NonFiniteWeightsError

    last = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"net.w": torch.ones(2)}, "global_step": 1}, last)
    before = last.read_bytes()
    for key in ("state_dict", "current_model_state"):
        bad = {
            "state_dict": {"net.w": torch.ones(2)},
            key: {"net.w": torch.tensor([1.0, float("inf")])},
            "global_step": 2,
        }
        with pytest.raises(NonFiniteWeightsError, match=rf"{key} tensor net.w is non-finite \(global step 2\)"):
            AtomicCheckpointIO().save_checkpoint(bad, last)
        assert last.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


@pytest.mark.parametrize(
    "lr, needle",
    [
        ("1e39", "the optimizer step at global step 0 overflowed float32 (lr=1e+39)"),  # finite, beyond float32
        ("1e37", "non-finite"),  # the first steps pass; the weights then overflow the forward pass
    ],
)
def test_a_huge_learning_rate_exits_3_and_writes_no_non_finite_checkpoint(
    fake_mnist_root, tmp_path, lr, needle, run_command
):
    run = tmp_path / "run"
    proc = run_command(
        "ddpm-train",
        [*TINY_TRAIN, "trainer.max_epochs=3", f"data.root={fake_mnist_root}", f"run_dir={run}", f"optimizer.lr={lr}"],
        cwd=tmp_path,
    )
    assert proc.returncode == 3, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: training stopped: ") and needle in last and "Traceback" not in proc.stderr
    for ckpt in run.glob("checkpoints/*.ckpt"):
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        assert all(
            torch.isfinite(v).all()
            for k in ("state_dict", "current_model_state")
            for v in state[k].values()
            if v.is_floating_point()
        ), ckpt


def test_weights_that_overflow_after_a_few_steps_stop_the_run_and_keep_the_last_good_checkpoint(
    tiny_train_overrides, monkeypatch
):
    """Three epochs of two steps; from step 3 on the learning rate is inf (which the config check refuses, so it is
    set on the optimizer): the loss of step 3 is finite, its update is not. The run stops at step 3 with
    NonFiniteWeightsError naming the first bad tensor, and last.ckpt stays the finite one of epoch 1, byte for byte."""
    from ddpm_lightning.errors import NonFiniteWeightsError
    from ddpm_lightning.module import DDPM

    cfg = compose_train([*tiny_train_overrides, "trainer.max_epochs=3"])
    last = Path(str(cfg.run_dir)) / "checkpoints" / "last.ckpt"
    saved = {}

    def huge_lr_from_step_3(self, batch, batch_idx):
        if self.global_step == 2:
            saved["last"] = last.read_bytes()
        if self.global_step >= 3:
            for group in self.trainer.optimizers[0].param_groups:
                group["lr"] = float("inf")

    monkeypatch.setattr(DDPM, "on_train_batch_start", huge_lr_from_step_3, raising=False)
    with pytest.raises(
        NonFiniteWeightsError,
        match=r"^training stopped: net\.\S+ is non-finite after the optimizer step "
        r"at global step 3 \(the loss was finite; lr=inf\)",
    ):
        train(cfg)
    assert last.read_bytes() == saved["last"]
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2
    for key in ["state_dict", "current_model_state"]:
        assert all(torch.isfinite(v).all() for v in ckpt[key].values() if v.is_floating_point())


class InjectNaN:
    """A callback that writes a NaN into the network's first parameter at the end of the step that brings the global
    step to ``at`` (after the optimizer step, before the module's own end-of-step hook, where the check runs)."""

    def __new__(cls, at: int):
        import lightning as L

        class _Inject(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if trainer.global_step == at:
                    with torch.no_grad():
                        next(pl_module.net.parameters()).view(-1)[0] = float("nan")

        return _Inject()


@pytest.mark.parametrize(
    "at, error, needle",
    [
        # injected just before the check at step 10: the weights, named, with the steps since the last verification (the
        # step-8 checkpoint checked steps 5 to 7)
        (
            10,
            "NonFiniteWeightsError",
            "is non-finite after the optimizer steps between global steps 8 and 9 (the loss was finite",
        ),
        # injected at step 6: the epoch-end checkpoint at step 8 comes before the next check (10) and checks first
        (6, "NonFiniteLossError", "non-finite loss nan at global step 6"),
    ],
)
def test_a_nan_injected_into_the_weights_between_two_checks_never_reaches_a_checkpoint(
    tiny_train_overrides, at, error, needle
):
    """Checks every 5 steps (trainer.log_every_n_steps), epochs of 4 steps (a checkpoint at every epoch end): a NaN
    written into a weight between two checks stops the run at the next check or checkpoint, whichever comes first,
    and no checkpoint ever holds it; last.ckpt stays the one of step 8 or 4."""
    from omegaconf import open_dict

    from ddpm_lightning import errors

    cfg = compose_train(
        [
            *tiny_train_overrides,
            "data.subset_size=8",
            "data.batch_size=2",
            "trainer.max_epochs=4",
            "trainer.log_every_n_steps=5",
        ]
    )
    with open_dict(cfg):
        cfg.callbacks.inject = {"_target_": f"{__name__}.InjectNaN", "at": at}
    with pytest.raises(getattr(errors, error)) as excinfo:
        train(cfg)
    message = str(excinfo.value)
    assert message.startswith("training stopped: ") and needle in message, message
    if error == "NonFiniteWeightsError":
        assert message.split(" is non-finite")[0] == f"training stopped: {_first_param_name(cfg)}"
    run = Path(str(cfg.run_dir))
    saved = sorted(run.glob("checkpoints/*.ckpt"))
    assert saved
    for ckpt in saved:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        assert state["global_step"] <= 8 and state["global_step"] < at
        assert all(
            torch.isfinite(v).all()
            for k in ("state_dict", "current_model_state")
            for v in state[k].values()
            if v.is_floating_point()
        ), ckpt
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == (
        8 if at > 8 else 4
    )


def _first_param_name(cfg) -> str:
    from ddpm_lightning.config import build

    return next(iter(build(cfg.model).named_parameters(prefix="net")))[0]


@pytest.mark.slow
def test_a_second_ddpm_train_on_a_held_run_dir_is_refused_in_one_line_and_can_resume_afterwards(
    fake_mnist_root, tmp_path
):
    """Two `ddpm-train ... run_dir=X ckpt_path=last` at once: one run and one one-line refusal naming the holder
    (pid, host, start time); the same command after the first has ended resumes its checkpoint."""
    import json
    import time

    run = tmp_path / "run"

    def args(epochs: int) -> list[str]:
        return [
            *TINY_TRAIN,
            f"trainer.max_epochs={epochs}",
            f"data.root={fake_mnist_root}",
            f"run_dir={run}",
            "ckpt_path=last",
        ]

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        [sys.executable, "-m", "ddpm_lightning.cli.train", *args(8)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and first.poll() is None:
            text = (run / ".ddpm-train.lock").read_text() if (run / ".ddpm-train.lock").is_file() else ""
            if text.strip():
                break
            time.sleep(0.2)
        holder = json.loads((run / ".ddpm-train.lock").read_text())
        assert holder["pid"] == first.pid
        with pytest.raises(ConfigError) as refused:  # the same command, in-process: it reaches the lock at once
            train(compose_train(args(8)))
        line = _one_line(refused.value)
        assert line.startswith(
            f"run_dir='{run}' is invalid: another ddpm-train is writing it (pid {first.pid} on host "
        )
        assert f"started {holder['started']}" in line and first.poll() is None
    finally:
        _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    assert len({f.name.split(".")[-2] for f in run.glob("tensorboard/events.out.tfevents.*")}) == 1  # one writer
    again = train(compose_train(args(9)))  # the lock is free again: the requeue resumes
    assert again["trainer"].current_epoch == 9
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["epoch"] == 8


def test_the_run_dir_lock_is_an_os_lock_released_by_a_crash(tmp_path):
    from ddpm_lightning.runlock import RunDirLock

    code = (
        f"import os; from ddpm_lightning.runlock import RunDirLock; RunDirLock({str(tmp_path)!r}).acquire(); "
        "os._exit(1)"
    )  # dies holding the lock, without any clean-up
    assert subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)}).returncode == 1
    assert (tmp_path / ".ddpm-train.lock").is_file()  # the file stays, the lock does not
    with RunDirLock(tmp_path):
        with pytest.raises(ConfigError, match=r"another ddpm-train is writing it \(pid \d+ on host"):
            RunDirLock(tmp_path).acquire()
    RunDirLock(tmp_path).acquire().release()


def test_an_error_line_is_one_write_so_that_ddp_ranks_sharing_stderr_never_merge_their_lines(monkeypatch):
    """Two DDP ranks print their SIGTERM line to one pipe; print() writes text and newline separately, and the two
    lines once came out as 'error: A...error: A...' on one line. One write of a short line to a pipe is atomic."""
    from ddpm_lightning.errors import print_error

    writes: list[str] = []

    class Recorder:
        def write(self, text: str) -> int:
            writes.append(text)
            return len(text)

        def flush(self) -> None:
            pass

    monkeypatch.setattr(sys, "stderr", Recorder())
    print_error("stopped by SIGTERM; the newest complete checkpoint is kept")
    assert writes == ["error: stopped by SIGTERM; the newest complete checkpoint is kept\n"]
