"""hparams_search=beta_optuna: real Optuna searches from the command line (a tiny network on synthetic IDX files), the
optimized_metric checks, and ddpm-report on the search's folder."""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path

import pytest
import yaml

from conftest import TINY_TRAIN, compose_train, run_train_cli

SEARCHED = {"schedule.beta_start", "schedule.beta_end", "optimizer.lr"}
#: TINY_TRAIN with one step per epoch and 2-step DDIM pictures: a trial takes a few seconds.
TINY = [o for o in TINY_TRAIN if not o.startswith(("callbacks.samples.sampler", "data.subset_size"))] + [
    "data.subset_size=8",
    "callbacks.samples.sampler={_target_: ddpm_lightning.samplers.DDIMSampler, steps: 2}",
]


@pytest.fixture
def optuna_sweeper():
    """Skips the test without the search extra (pip install -e ".[search]")."""
    return pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")


def _search(run_command, args: list[str], root: Path, sweep: Path, cwd: Path):
    """The search as ``ddpm-train -m hparams_search=beta_optuna ...`` runs it (its entry point, in this process)."""
    return run_command(
        "ddpm-train",
        ["-m", "hparams_search=beta_optuna", *TINY, *args, f"data.root={root}", f"hydra.sweep.dir={sweep}"],
        cwd=cwd,
    )


def _trial_states(db: Path) -> list[str]:
    with sqlite3.connect(db) as con:
        return [row[0] for row in con.execute("select state from trials order by number")]


@pytest.mark.slow
def test_a_three_trial_fid_search_end_to_end_and_its_report(optuna_sweeper, fake_mnist_root, tmp_path, run_command):
    """The default objective: the FID of the end-of-run evaluation (8 samples here). Three job folders, the sqlite
    study next to them, optimization_results.yaml with the three searched keys and the lowest FID; ddpm-report
    tables the trials and names Optuna's best."""
    sweep = tmp_path / "sweep"
    proc = _search(
        run_command,
        ["hydra.sweeper.n_trials=3", "evaluate.num_samples=8", "evaluate.batch_size=8", "evaluate.sampler.steps=2"],
        fake_mnist_root,
        sweep,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1", "2"]
    assert _trial_states(sweep / "optuna.db") == ["COMPLETE"] * 3
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(results["best_params"]) == SEARCHED
    fids = [json.loads(next((sweep / j).glob("evaluate/step_*/metrics.json")).read_text())["fid"] for j in "012"]
    assert results["best_value"] == pytest.approx(min(fids), rel=1e-12)
    best = str(fids.index(min(fids)))
    overrides = yaml.safe_load((sweep / best / ".hydra" / "overrides.yaml").read_text())
    for key, value in results["best_params"].items():
        assert float(next(o for o in overrides if o.startswith(f"{key}=")).split("=", 1)[1]) == pytest.approx(value)

    report = run_command("ddpm-report", [str(sweep)], cwd=tmp_path)
    assert report.returncode == 0, report.stderr[-3000:]
    md = (sweep / "report.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ") and line[2].isdigit()}
    assert sorted(rows) == ["0", "1", "2"]
    assert rows[best].rstrip(" |").endswith("**best**, optuna")  # lowest FID in the table and Optuna's best agree
    assert f"Optuna's best trial (optimization_results.yaml): job {best} (marked optuna), fid=" in md
    assert all(f"`{key}=" in md for key in SEARCHED) and "`hparams_search=beta_optuna`" in md


@pytest.mark.slow
def test_a_diverged_trial_ranks_last_and_the_search_goes_on(optuna_sweeper, fake_mnist_root, tmp_path, run_command):
    """optimized_metric=val/loss without evaluation; lr drawn from {1e-3, 1e30}: with TPE seed 0 trial 1 draws 1e30
    and its loss is NaN at step 1. It reports inf (a completed trial ranked last) with a warning line; the other
    trials run and the best is a finite one."""
    sweep = tmp_path / "sweep"
    proc = _search(
        run_command,
        [
            "hydra.sweeper.n_trials=3",
            "optimized_metric=val/loss",
            "evaluate=null",
            "data.subset_size=16",
            "optimizer.lr=choice(1e-3,1e30)",
        ],
        fake_mnist_root,
        sweep,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "non-finite loss" in warnings[0] and "reports optimized_metric=inf" in warnings[0]
    assert _trial_states(sweep / "optuna.db") == ["COMPLETE"] * 3
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert math.isfinite(results["best_value"]) and results["best_params"]["optimizer.lr"] == 1e-3
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1", "2"]


@pytest.mark.parametrize(
    "args, starts",
    [
        (
            ["-m", "hparams_search=beta_optuna", "optimized_metric=val/los"],
            "error: optimized_metric='val/los' is invalid: this run produces no such metric (did you mean val/loss?); "
            "it produces: confident_fraction, fid, ",
        ),
        (
            ["optimized_metric=fid"],
            "error: optimized_metric='fid' is invalid: this run produces no such metric (fid needs an evaluate: node, "
            "e.g. ++evaluate.num_samples=1000); it produces: train/loss, ",
        ),
    ],
)
def test_an_unknown_optimized_metric_is_one_line_before_any_work(args, starts, tmp_path):
    """Checked against the metrics the composed config can produce before Hydra starts: no sweep folder, no study."""
    if "hparams_search=beta_optuna" in args:
        pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    proc = run_train_cli(
        [*args, f"hydra.sweep.dir={tmp_path / 'sweep'}", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, timeout=120
    )
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(starts) and "val/loss" in lines[0], proc.stderr
    assert not (tmp_path / "sweep").exists() and not (tmp_path / "run").exists()


def test_the_metric_names_a_config_can_produce(optuna_sweeper):
    from ddpm_lightning.search import metric_names

    plain = metric_names(compose_train([]))
    assert "val/loss" in plain and "train/loss_epoch" in plain and "fid" not in plain and "val/bpd" not in plain
    search = metric_names(compose_train(["hparams_search=beta_optuna", "callbacks.bpd.every_n_epochs=1"]))
    assert {"fid", "fid_floor", "val/bpd", "val/loss"} <= set(search) and "bpd" not in search
    assert "bpd" in metric_names(compose_train(["++evaluate.nll=true"]))


def test_a_search_without_the_optuna_sweeper_is_one_line(monkeypatch):
    from ddpm_lightning.cli import train as cli
    from ddpm_lightning.errors import ConfigError

    monkeypatch.setattr(cli, "has_optuna_sweeper", lambda: False)
    with pytest.raises(
        ConfigError,
        match=r"""^hparams_search='beta_optuna' is invalid: needs the Optuna sweeper: """
        r"""pip install -e "\.\[search\]"$""",
    ):
        cli.check_search(["-m", "hparams_search=beta_optuna"])


def test_the_objective_under_an_optimising_sweeper_and_outside_one(capsys):
    from ddpm_lightning.errors import ConfigError
    from ddpm_lightning.search import objective

    cfg = {"optimized_metric": "val/loss"}
    assert objective(cfg, {"val/loss": 0.25, "fid": 9.0}, "minimize") == 0.25
    assert objective({"optimized_metric": "fid"}, {"fid": float("nan")}, "minimize") == math.inf
    assert objective({"optimized_metric": "fid"}, {"fid": float("nan")}, "maximize") == -math.inf
    assert capsys.readouterr().err.startswith(
        "warning: optimized_metric=fid is nan; the trial reports inf (ranked last)"
    )
    assert objective(cfg, {"fid": 9.0}, None) is None  # a single run: nothing reads the value
    with pytest.raises(
        ConfigError,
        match=r"^optimized_metric='val/loss' is invalid: the run logged no such metric "
        r"\(no validation ran: .*\); it has: fid, train/loss$",
    ):
        objective(cfg, {"fid": 9.0, "train/loss": 1.0}, "minimize")
