"""ddpm-report: a fake sweep written by the tests (overrides + TensorBoard event files), and one real tiny sweep."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from ddpm_lightning.cli.report import main
from ddpm_lightning.report import report

from conftest import CONF_DIR

REPO = CONF_DIR.parent
QUARTILES = [f"val/loss_q{q}" for q in range(4)]


def _job(sweep: Path, num: int, overrides: list[str]) -> Path:
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (job / ".hydra" / "config.yaml").write_text("seed: 0\n")
    return job


def _events(job: Path, scalars: dict[str, list[tuple[int, float]]]) -> None:
    """One event file in ``job/tensorboard`` holding ``{tag: [(step, value), ...]}``."""
    writer = SummaryWriter(log_dir=str(job / "tensorboard"))
    for tag, points in scalars.items():
        for step, value in points:
            writer.add_scalar(tag, value, step)
    writer.close()


def _losses(step: int, val: float, q: list[float], train: float) -> dict[str, list[tuple[int, float]]]:
    out = {"val/loss": [(step, val)], "train/loss_epoch": [(step, train)]}
    out.update({tag: [(step, v)] for tag, v in zip(QUARTILES, q, strict=True)})
    return out


@pytest.fixture
def fake_sweep(tmp_path: Path) -> Path:
    """Jobs 0..3 (plus 10 to check numeric order) over beta_end, lr constant:

    * 0: beta_end=0.02, two epochs in one file, final val/loss 0.30;
    * 1: beta_end=0.1, resumed: first file ends at step 4 with 0.50, the second file continues to step 8 with 0.20
      (the best);
    * 2: beta_end=0.2, only train/loss_epoch (no val/loss);
    * 3: beta_end=0.5, no event file at all;
    * 10: beta_end=1e-3, val/loss 0.40.
    """
    sweep = tmp_path / "sweep"
    (sweep).mkdir()
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    fixed = ["optimizer.lr=0.001", "model=adm_tiny"]
    j0 = _job(sweep, 0, ["schedule.beta_end=0.02", *fixed])
    _events(
        j0,
        {
            "val/loss": [(2, 0.9), (4, 0.3)],
            **{t: [(4, 0.31 + i / 100)] for i, t in enumerate(QUARTILES)},
            "train/loss_epoch": [(2, 1.0), (4, 0.35)],
        },
    )
    j1 = _job(sweep, 1, ["schedule.beta_end=0.1", *fixed])
    _events(j1, _losses(4, 0.5, [0.51, 0.52, 0.53, 0.54], 0.6))
    # the resumed run writes a second file (the names differ by a per-process counter after the second)
    _events(j1, _losses(8, 0.2, [0.21, 0.22, 0.23, 0.24], 0.25))
    assert len(list((j1 / "tensorboard").glob("events.out.tfevents.*"))) == 2
    j2 = _job(sweep, 2, ["schedule.beta_end=0.2", *fixed])
    _events(j2, {"train/loss_epoch": [(4, 0.7)]})
    _job(sweep, 3, ["schedule.beta_end=0.5", *fixed])
    j10 = _job(sweep, 10, ["schedule.beta_end=1e-3", *fixed])
    _events(j10, _losses(4, 0.4, [0.41, 0.42, 0.43, 0.44], 0.45))
    (sweep / "notes").mkdir()  # not a job
    return sweep


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _md_rows(text: str) -> dict[str, list[str]]:
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for ln in lines[1:]:
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells, strict=True))
    return rows


def _assert_png(path: Path) -> None:
    assert path.is_file(), path
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] > 100 and img.size[1] > 100
        img.verify()


def test_report_of_a_fake_sweep(fake_sweep, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(fake_sweep), "--out", str(out)]) == 0
    printed = capsys.readouterr().out

    md = (out / "report.md").read_text()
    rows = _md_rows(md)
    assert list(rows) == ["0", "1", "2", "3", "10"]  # numeric order, "notes" skipped
    assert rows["0"]["schedule.beta_end"] == "0.02" and "optimizer.lr" not in rows["0"]  # only swept columns
    assert "`optimizer.lr=0.001`" in md and "`model=adm_tiny`" in md  # the shared overrides under the table
    assert rows["0"]["val/loss"] == "0.3" and rows["0"]["train/loss"] == "0.35"  # value at the largest step
    assert [rows["0"][f"q{q}"] for q in range(4)] == ["0.31", "0.32", "0.33", "0.34"]
    # the resumed job: the two event files merged, the second one's final step wins
    assert rows["1"]["val/loss"] == "0.2" and rows["1"]["step"] == "8" and rows["1"]["q3"] == "0.24"
    assert rows["2"]["status"] == "no val/loss" and rows["2"]["val/loss"] == "" and rows["2"]["train/loss"] == "0.7"
    assert rows["3"]["status"] == "no event file" and rows["3"]["step"] == ""
    assert rows["10"]["status"] == "ok" and rows["10"]["val/loss"] == "0.4"
    assert [r for r in rows if rows[r]["best"] == "**best**"] == ["1"]
    assert "fid" not in rows["0"]
    assert md.split("\n", 2)[2] in printed  # the table is printed

    csv_rows = _rows(out / "report.csv")
    assert [r["job"] for r in csv_rows] == ["0", "1", "2", "3", "10"]
    by_job = {r["job"]: r for r in csv_rows}
    assert by_job["1"]["schedule.beta_end"] == "0.1" and by_job["1"]["optimizer.lr"] == "0.001"
    assert float(by_job["1"]["val/loss"]) == pytest.approx(0.2) and by_job["1"]["step"] == "8"
    assert float(by_job["0"]["val/loss_q2"]) == pytest.approx(0.33)
    assert by_job["2"]["val/loss"] == "" and by_job["2"]["status"] == "no val/loss"
    assert [r["best"] for r in csv_rows] == ["0", "1", "0", "0", "0"]

    for name in ["val_loss", *[f"val_loss_q{q}" for q in range(4)]]:
        _assert_png(out / f"report_{name}.png")
        assert str(out / f"report_{name}.png") in printed
    assert not (out / "report_fid.png").exists()
    assert not (fake_sweep / "report.md").exists()


def test_fid_from_metrics_json_ranks_and_is_plotted(fake_sweep):
    """With metrics.json the best job is the lowest FID (job 0), not the lowest val/loss (job 1)."""
    (fake_sweep / "0" / "metrics.json").write_text(json.dumps({"fid": 12.5, "inception_score": 8.1, "note": "x"}))
    (fake_sweep / "1" / "metrics.json").write_text(json.dumps({"fid": 30.0, "inception_score": 7.0}))
    result = report(fake_sweep)  # default out: the sweep directory
    assert result["best"] == "0" and result["rank_metric"] == "fid"
    rows = _md_rows((fake_sweep / "report.md").read_text())
    assert rows["0"]["fid"] == "12.5" and rows["1"]["fid"] == "30" and rows["2"]["fid"] == ""
    assert rows["0"]["best"] == "**best**" and rows["1"]["best"] == ""
    by_job = {r["job"]: r for r in _rows(fake_sweep / "report.csv")}
    assert float(by_job["0"]["inception_score"]) == pytest.approx(8.1) and "note" not in by_job["0"]
    _assert_png(fake_sweep / "report_fid.png")


def test_the_end_of_run_evaluation_is_read_and_its_classifier_named(fake_sweep):
    """ddpm-train writes <job>/evaluate/step_<N>/metrics.json: the newest step is reported, with its classifier."""
    from ddpm_lightning.classifier import REFERENCE_CLASSIFIER_SHA256 as REF

    for job, step, fid in [("0", 10, 50.0), ("0", 100, 9.5), ("1", 100, 20.0)]:
        path = fake_sweep / job / "evaluate" / f"step_{step:06d}" / "metrics.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"fid": fid, "confident_fraction": 0.5, "classifier_sha256": REF}))
    result = report(fake_sweep)
    assert result["best"] == "0" and result["rank_metric"] == "fid"
    text = (fake_sweep / "report.md").read_text()
    rows = _md_rows(text)
    assert rows["0"]["fid"] == "9.5" and rows["1"]["fid"] == "20"
    assert f"FID measured with the classifier `{REF}` (the packaged reference)" in text
    by_job = {r["job"]: r for r in _rows(fake_sweep / "report.csv")}
    assert by_job["0"]["classifier_sha256"] == REF and by_job["2"]["classifier_sha256"] == ""


def test_two_swept_parameters_and_chosen_metrics(tmp_path):
    sweep = tmp_path / "sweep"
    num = 0
    for lr in ["1e-4", "1e-3"]:
        for beta in ["0.01", "0.02", "0.2"]:
            job = _job(sweep, num, [f"schedule.beta_end={beta}", f"optimizer.lr={lr}"])
            _events(job, _losses(2, float(beta) + float(lr), [0.1, 0.2, 0.3, 0.4], 1.0))
            num += 1
    result = report(sweep, tmp_path / "out", metrics=["val/loss", "train/loss_epoch"])
    assert result["swept"] == ["schedule.beta_end", "optimizer.lr"]
    assert result["best"] == "0"
    assert [p.name for p in result["plots"]] == ["report_val_loss.png", "report_train_loss_epoch.png"]
    for p in result["plots"]:
        _assert_png(p)


def test_non_numeric_swept_values_are_plotted_as_categories(tmp_path):
    sweep = tmp_path / "sweep"
    for num, kind in enumerate(["linear", "cosine"]):
        _events(_job(sweep, num, [f"schedule.kind={kind}"]), _losses(2, 0.5 - num / 10, [0.1] * 4, 1.0))
    result = report(sweep)
    assert result["best"] == "1"
    _assert_png(sweep / "report_val_loss.png")


@pytest.mark.parametrize("layout", ["empty", "missing", "single_run", "numeric_without_hydra"])
def test_not_a_sweep_is_one_line_and_exit_2(tmp_path, capsys, layout):
    path = tmp_path / "x"
    if layout != "missing":
        path.mkdir()
    if layout == "single_run":  # a plain ddpm-train run directory
        (path / ".hydra").mkdir()
        (path / ".hydra" / "overrides.yaml").write_text("- trainer.max_epochs=1\n")
    if layout == "numeric_without_hydra":
        (path / "0").mkdir()
    with pytest.raises(SystemExit) as exited:  # the one command wrapper (config.run_command) exits with the status
        main([str(path)])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err == (f"error: {path} is not a Hydra multirun directory (expected {path}/0/.hydra/overrides.yaml)\n")


@pytest.mark.slow
def test_real_tiny_sweep_end_to_end(tiny_sweep, tmp_path, run_command):
    """The session's real 3-job sweep (conftest.tiny_sweep), copied (the report writes into the sweep folder), then
    ddpm-report on it."""
    import shutil

    sweep = tmp_path / "sweep"
    shutil.copytree(tiny_sweep, sweep)
    proc = run_command("ddpm-report", [str(sweep)], cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _md_rows((sweep / "report.md").read_text())
    assert list(rows) == ["0", "1", "2"]
    assert [rows[j]["schedule.beta_end"] for j in rows] == ["0.02", "0.1", "0.2"]
    for row in rows.values():
        assert row["status"] == "ok" and row["step"] == "1" and row["epoch"] == "0"  # 8 images / batch 8
        assert all(float(row[c]) > 0 for c in ["val/loss", "q0", "q1", "q2", "q3", "train/loss"])
    assert sum(r["best"] == "**best**" for r in rows.values()) == 1
    assert "| job | schedule.beta_end |" in proc.stdout and f"wrote {sweep / 'report.csv'}" in proc.stdout
    _assert_png(sweep / "report_val_loss.png")
    assert len(_rows(sweep / "report.csv")) == 3


def test_bits_per_dim_columns_from_the_evaluation_or_the_callback(fake_sweep):
    """ddpm-evaluate nll=true writes bpd, bpd_stderr and bpd_all_pixels: they get their columns and a plot; a job with
    only the val/bpd callback shows its last value."""
    path = fake_sweep / "0" / "evaluate" / "step_000004" / "metrics.json"
    path.parent.mkdir(parents=True)
    path.write_text(
        json.dumps(
            {
                "fid": 9.0,
                "bpd": 1.234567,
                "bpd_stderr": 0.0123,
                "bpd_all_pixels": 0.99,
                "quartile_bpd": [1.0, 0.1, 0.1, 0.034567],
            }
        )
    )
    _events(fake_sweep / "10", {"val/bpd": [(2, 3.0), (4, 2.5)]})
    report(fake_sweep)
    rows = _md_rows((fake_sweep / "report.md").read_text())
    assert rows["0"]["bits/dim (784 px)"] == "1.2346" and rows["0"]["± s.e."] == "0.0123"
    assert rows["0"]["bits/dim (1024 px)"] == "0.99" and rows["10"]["bits/dim (784 px)"] == "2.5"
    assert rows["1"]["bits/dim (784 px)"] == ""
    by_job = {r["job"]: r for r in _rows(fake_sweep / "report.csv")}
    assert float(by_job["0"]["bpd"]) == pytest.approx(1.234567) and float(by_job["10"]["val/bpd"]) == 2.5
    _assert_png(fake_sweep / "report_bpd.png")
