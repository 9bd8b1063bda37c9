"""Summarising a Hydra multirun sweep of ``ddpm-train`` in a table and one plot per metric (the body of
``ddpm-report``, :mod:`ddpm_lightning.cli.report`).

Usage::

    ddpm-report <sweep dir> [--out DIR] [--metric val/loss --metric fid ...] [--log-x auto|on|off]

Input: the directory written by ``ddpm-train -m schedule.beta_end=0.02,0.1,0.2 ...``
(``hydra.sweep.dir``). Each job is a numeric sub-folder ``<sweep>/<n>`` (read in numeric order) holding

* ``.hydra/overrides.yaml``: a YAML list of ``key=value`` strings (required: a folder without it is not a job);
  the *swept parameters* are the override keys whose values differ across jobs;
* ``tensorboard/events.out.tfevents.*``: TensorBoard scalars; the report keeps, for each of ``val/loss``,
  ``val/loss_q0`` .. ``val/loss_q3``, ``train/loss_epoch`` (and ``val/fid``, ``val/bpd`` when logged), the value at the
  largest step. Several event files in one folder are one run continued after a resume: they are merged, and at equal
  steps the later-written value wins;
* ``checkpoints/last.ckpt`` (optional): ``global_step`` and ``epoch`` are read from it;
* ``metrics.json`` (optional, written by ``ddpm-evaluate``; else the newest ``evaluate/step_<N>/metrics.json`` of
  ``ddpm-train``'s end-of-run evaluation): a JSON object; its numeric top-level values (``fid``, ``fid_floor``,
  ``inception_score``, ``normalised_entropy``, ``confident_fraction``, ...) are reported, and its
  ``classifier_sha256`` (the classifier the FID was measured with) is named under the table.

An Optuna search (``ddpm-train -m hparams_search=beta_optuna``) writes the same job folders, plus ``optuna.db`` and
``optimization_results.yaml`` (``best_params``: ``{key: value}``, ``best_value``): when that file exists, the job
whose overrides hold the best parameters is marked ``optuna`` in the ``best`` column and named under the table with
its parameters, its value and the jobs' ``optimized_metric`` (from ``<job>/.hydra/config.yaml``).

Outputs in ``--out`` (default: the sweep directory):

* ``report.md``: a markdown table, one row per job: ``job``, the swept parameters, ``status``, ``step``,
  ``epoch``, ``val/loss``, ``q0`` .. ``q3`` (the ``val/loss_q*`` timestep-quartile losses),
  ``train/loss``, ``fid`` (when any job has one), the bound in bits/dim over the 784 real pixels, its standard error
  and over all 1024 pixels (``bpd``, ``bpd_stderr``, ``bpd_all_pixels`` of ``ddpm-evaluate nll=true``, or the last
  ``val/bpd``; when any job has one), and ``best`` (``**best**`` on the job with the lowest
  ``fid`` when any job has a FID, else the lowest ``val/loss``; ``optuna`` on Optuna's best trial). The overrides
  shared by all jobs are listed under the table.
* ``report.csv``: the same rows with every column: ``job``, every override key (swept ones first),
  ``status``, ``step``, ``epoch``, the TensorBoard scalars under their tag names, every ``metrics.json`` key,
  ``classifier_sha256`` and ``best`` (1 or 0). Missing values are empty cells; floats are written with full precision.
* ``report_<metric>.png`` (``/`` in the metric name becomes ``_``, e.g. ``report_val_loss_q0.png``): the
  metric against the first swept parameter (a numeric axis when all its values are numbers, logarithmic when
  they are positive and span more than 10x, unless ``--log-x`` says otherwise), one line per value of the other
  swept parameters. Default metrics: ``val/loss``, ``val/loss_q0`` .. ``val/loss_q3``, and ``fid`` and ``bpd`` when
  present.

A job without an event file or without ``val/loss`` stays in the table with its status (``no event file``,
``no val/loss``) and blank values. A path without any job folder is an error: one line on stderr, exit status 2.
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from typing import Any

import yaml

from ddpm_lightning.classifier import REFERENCE_CLASSIFIER_SHA256
from ddpm_lightning.errors import ProjectError
from ddpm_lightning.filesystem import check_writable_folder

#: TensorBoard scalar tags read from every job, in table order.
SCALAR_TAGS = [
    "val/loss",
    "val/loss_q0",
    "val/loss_q1",
    "val/loss_q2",
    "val/loss_q3",
    "train/loss_epoch",
    "val/fid",
    "val/bpd",
]
#: Tags read only when some job logged them (the optional callbacks).
OPTIONAL_TAGS = ("val/fid", "val/bpd")
#: Short markdown column names of the scalar tags.
SHORT = {
    "val/loss_q0": "q0",
    "val/loss_q1": "q1",
    "val/loss_q2": "q2",
    "val/loss_q3": "q3",
    "train/loss_epoch": "train/loss",
}
DEFAULT_METRICS = ["val/loss", "val/loss_q0", "val/loss_q1", "val/loss_q2", "val/loss_q3", "fid", "bpd"]
#: Plotted and tabulated only when some job has them.
OPTIONAL_METRICS = ("fid", "bpd")


class NotASweepError(ProjectError, ValueError):
    """The path holds no numeric job folder with ``.hydra/overrides.yaml`` (exit status 2)."""

    exit_status = 2


# ----------------------------------------------------------------------------------------------------- reading
def find_jobs(sweep: Path) -> list[Path]:
    """The job folders of a multirun directory: numeric sub-folders with ``.hydra/overrides.yaml``, in numeric
    order. Raises :class:`NotASweepError` when there is none."""
    sweep = Path(sweep)
    jobs = []
    if sweep.is_dir():
        jobs = [p for p in sweep.iterdir() if p.name.isdigit() and (p / ".hydra" / "overrides.yaml").is_file()]
    if not jobs:
        raise NotASweepError(f"{sweep} is not a Hydra multirun directory (expected {sweep}/0/.hydra/overrides.yaml)")
    return sorted(jobs, key=lambda p: int(p.name))


def read_overrides(job: Path) -> dict[str, str]:
    """``.hydra/overrides.yaml`` (a YAML list of ``key=value`` strings) as an ordered ``{key: value}`` dict.
    The value is everything after the first ``=``; a leading ``+``/``++`` on the key is dropped."""
    items = yaml.safe_load((Path(job) / ".hydra" / "overrides.yaml").read_text()) or []
    out: dict[str, str] = {}
    for item in items:
        key, _, value = str(item).partition("=")
        out[key.lstrip("+")] = value
    return out


#: Written into the sweep folder by hydra-optuna-sweeper at the end of a search.
OPTUNA_RESULTS = "optimization_results.yaml"


def _same(text: Any, value: Any) -> bool:
    """An override's text is the value Optuna proposed (numbers compared as numbers, to 12 digits)."""
    a, b = _number(text), _number(value)
    return math.isclose(a, b, rel_tol=1e-12) if a is not None and b is not None else str(text) == str(value)


def read_optuna(sweep: Path, jobs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The sweep's ``optimization_results.yaml`` (None when absent, unreadable or not a single-objective result):
    ``{"best_params", "best_value", "job"}``, ``job`` being the last job whose overrides hold every best parameter
    (None when no job folder does), and ``metric``: that job's (else the first job's) ``optimized_metric``."""
    try:
        data = yaml.safe_load((Path(sweep) / OPTUNA_RESULTS).read_text())
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("best_params"), dict):
        return None
    params = data["best_params"]
    matches = [j["job"] for j in jobs if all(_same(j["overrides"].get(k), v) for k, v in params.items())]
    job = matches[-1] if matches else None
    metric = None
    for name in [job, jobs[0]["job"]] if job is not None else [jobs[0]["job"]]:
        try:
            config = yaml.safe_load((Path(sweep) / name / ".hydra" / "config.yaml").read_text())
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(config, dict) and config.get("optimized_metric") is not None:
            metric = str(config["optimized_metric"])
            break
    return {"best_params": params, "best_value": _number(data.get("best_value")), "job": job, "metric": metric}


def read_scalars(folder: Path, tags: list[str] | None = None) -> dict[str, tuple[int, float]]:
    """``{tag: (step, value)}`` at the largest step, over all ``events.out.tfevents.*`` files under ``folder``.

    Each file is read on its own and merged, so a run resumed into the same folder (a second event file that
    repeats or continues the steps) gives the final value; at equal steps the later wall time wins. ``tags``:
    keep only these (default: all scalar tags)."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    best: dict[str, tuple[int, float, float]] = {}  # tag -> (step, wall_time, value)
    for file in sorted(Path(folder).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(file), size_guidance={SCALARS: 0})
        try:
            acc.Reload()
        except Exception:  # a truncated file of a killed job: use what the other files hold
            continue
        for tag in acc.Tags().get("scalars", []):
            if tags is not None and tag not in tags:
                continue
            for ev in acc.Scalars(tag):
                cand = (int(ev.step), float(ev.wall_time), float(ev.value))
                if tag not in best or cand[:2] >= best[tag][:2]:
                    best[tag] = cand
    return {tag: (step, value) for tag, (step, _, value) in best.items()}


def read_checkpoint_progress(ckpt: Path) -> dict[str, int]:
    """``{"step": global_step, "epoch": epoch}`` of a Lightning checkpoint, ``{}`` when absent or unreadable."""
    if not Path(ckpt).is_file():
        return {}
    import torch

    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception:
        return {}
    out = {}
    for key, name in [("global_step", "step"), ("epoch", "epoch")]:
        if isinstance(state.get(key), int):
            out[name] = state[key]
    return out


def metrics_json_path(job: Path) -> Path | None:
    """``<job>/metrics.json`` when it exists, else the newest ``<job>/evaluate/step_<N>/metrics.json`` (the
    end-of-run evaluation of ``ddpm-train``, largest N), else None."""
    job = Path(job)
    if (job / "metrics.json").is_file():
        return job / "metrics.json"
    steps = sorted(job.glob("evaluate/step_*/metrics.json"), key=lambda p: (len(p.parent.name), p.parent.name))
    return steps[-1] if steps else None


def _read_json(job: Path) -> dict[str, Any]:
    path = metrics_json_path(job)
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_metrics_json(job: Path, data: dict[str, Any] | None = None) -> dict[str, float]:
    """The numeric top-level values of the job's metrics file (:func:`metrics_json_path`; ``{}`` when absent or not a
    JSON object); ``data``: that file's content when the caller has already read it."""
    data = _read_json(job) if data is None else data
    return {k: float(v) for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def read_job(job: Path) -> dict[str, Any]:
    """One job as a dict: ``job`` (folder name), ``overrides``, ``status``, ``step``, ``epoch``, ``scalars``
    (``{tag: value}``) and ``metrics`` (from ``metrics.json``)."""
    job = Path(job)
    tb = job / "tensorboard" if (job / "tensorboard").is_dir() else job
    has_events = any(tb.rglob("events.out.tfevents.*"))
    found = read_scalars(tb, SCALAR_TAGS) if has_events else {}
    progress = read_checkpoint_progress(job / "checkpoints" / "last.ckpt")
    step = progress.get("step")
    if step is None and found:
        step = max(s for s, _ in found.values())
    if not has_events:
        status = "no event file"
    elif "val/loss" not in found:
        status = "no val/loss"
    elif not math.isfinite(found["val/loss"][1]):
        status = "non-finite val/loss"
    else:
        status = "ok"
    metrics_file = _read_json(job)
    metrics = read_metrics_json(job, metrics_file)
    for key, tag in (("fid", "val/fid"), ("bpd", "val/bpd")):  # the callbacks' last value stands in
        if key not in metrics and tag in found:
            metrics[key] = found[tag][1]
    return {
        "job": job.name,
        "overrides": read_overrides(job),
        "status": status,
        "step": step,
        "epoch": progress.get("epoch"),
        "scalars": {tag: value for tag, (_, value) in found.items()},
        "metrics": metrics,
        "classifier": metrics_file.get("classifier_sha256"),
    }


def swept_keys(jobs: list[dict[str, Any]]) -> list[str]:
    """Override keys whose value differs across jobs (a key missing in some job counts as differing)."""
    keys: list[str] = []
    for j in jobs:
        keys += [k for k in j["overrides"] if k not in keys]
    return [k for k in keys if len({j["overrides"].get(k) for j in jobs}) > 1]


def _number(text: Any) -> float | None:
    if text is None or isinstance(text, bool):
        return None
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def metric_value(job: dict[str, Any], metric: str) -> float | None:
    """A job's value of ``metric``: a TensorBoard tag (``val/loss``) or a ``metrics.json`` key (``fid``)."""
    value = job["scalars"].get(metric, job["metrics"].get(metric))
    return value if value is not None and math.isfinite(value) else None


def best_job(jobs: list[dict[str, Any]]) -> tuple[str | None, str]:
    """``(job name, ranking metric)``: the lowest ``fid`` when any job has one, else the lowest ``val/loss``."""
    metric = "fid" if any(metric_value(j, "fid") is not None for j in jobs) else "val/loss"
    ranked = [(metric_value(j, metric), int(j["job"])) for j in jobs if metric_value(j, metric) is not None]
    return (str(min(ranked)[1]) if ranked else None), metric


# ----------------------------------------------------------------------------------------------------- writing
def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.5g}"
    return str(value)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(
    jobs: list[dict[str, Any]],
    swept: list[str],
    best: str | None,
    rank_metric: str,
    optuna: dict[str, Any] | None = None,
) -> str:
    """The ``report.md`` text: the table, then the ranking metric, Optuna's best trial (``optuna``: see
    :func:`read_optuna`) and the overrides shared by all jobs."""
    has_fid = any(metric_value(j, "fid") is not None for j in jobs)
    tags = ["val/loss", "val/loss_q0", "val/loss_q1", "val/loss_q2", "val/loss_q3", "train/loss_epoch"]
    header = ["job", *swept, "status", "step", "epoch", *[SHORT.get(t, t) for t in tags]]
    if has_fid:
        header.append("fid")
    has_bpd = any(metric_value(j, "bpd") is not None for j in jobs)
    if has_bpd:
        header += ["bits/dim (784 px)", "± s.e.", "bits/dim (1024 px)"]
    header.append("best")
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    for j in jobs:
        row = [j["job"], *[j["overrides"].get(k, "") for k in swept], j["status"], _fmt(j["step"]), _fmt(j["epoch"])]
        row += [_fmt(j["scalars"].get(t)) for t in tags]
        if has_fid:
            row.append(_fmt(j["metrics"].get("fid")))
        if has_bpd:
            row += [_fmt(j["metrics"].get(k)) for k in ("bpd", "bpd_stderr", "bpd_all_pixels")]
        optuna_best = optuna is not None and j["job"] == optuna["job"]
        row.append(", ".join(["**best**"] * (j["job"] == best) + ["optuna"] * optuna_best))
        lines.append("| " + " | ".join(_md_cell(c) for c in row) + " |")
    fixed = {k: v for k, v in jobs[0]["overrides"].items() if k not in swept}
    lines.append("")
    lines.append(f"best: lowest {rank_metric}" + (f" (job {best})" if best is not None else " (no job has one)"))
    if optuna is not None:
        where = (
            f"job {optuna['job']} (marked optuna)"
            if optuna["job"] is not None
            else "no job folder with these parameters"
        )
        params = ", ".join(f"`{k}={v}`" for k, v in optuna["best_params"].items())
        lines.append("")
        lines.append(
            f"Optuna's best trial ({OPTUNA_RESULTS}): {where}, {optuna['metric'] or 'value'}="
            f"{_fmt(optuna['best_value'])} with {params}"
        )
    classifiers: dict[str, list[str]] = {}
    for j in jobs:
        if j.get("classifier"):
            classifiers.setdefault(str(j["classifier"]), []).append(j["job"])
    if classifiers:
        lines.append("")
        lines.append(
            "FID measured with the classifier "
            + "; ".join(
                f"`{sha}`"
                + (" (the packaged reference)" if sha == REFERENCE_CLASSIFIER_SHA256 else "")
                + (f" (jobs {', '.join(js)})" if len(classifiers) > 1 else "")
                for sha, js in classifiers.items()
            )
        )
    if fixed:
        lines.append("")
        lines.append("Overrides shared by all jobs: " + ", ".join(f"`{k}={v}`" for k, v in fixed.items()))
    return "\n".join(lines) + "\n"


def write_csv(path: Path, jobs: list[dict[str, Any]], swept: list[str], best: str | None) -> None:
    """``report.csv``: one row per job, every override, the scalars, the ``metrics.json`` values, ``best``."""
    keys = list(swept)
    for j in jobs:
        keys += [k for k in j["overrides"] if k not in keys]
    # the loss columns always (empty when no job has them), other tags only when some job logged them
    tags = [t for t in SCALAR_TAGS if t not in OPTIONAL_TAGS or any(t in j["scalars"] for j in jobs)]
    mkeys: list[str] = []
    for j in jobs:
        mkeys += [k for k in j["metrics"] if k not in mkeys]
    header = ["job", *keys, "status", "step", "epoch", *tags, *mkeys, "classifier_sha256", "best"]
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for j in jobs:
            row = [j["job"], *[j["overrides"].get(k, "") for k in keys], j["status"], j["step"], j["epoch"]]
            row += [j["scalars"].get(t) for t in tags] + [j["metrics"].get(k) for k in mkeys]
            row += [j.get("classifier"), int(j["job"] == best)]
            writer.writerow(["" if v is None else (repr(v) if isinstance(v, float) else v) for v in row])


def metric_filename(metric: str) -> str:
    """``report_<metric>.png`` with every character outside ``[A-Za-z0-9_.-]`` replaced by ``_``."""
    return "report_" + re.sub(r"[^A-Za-z0-9_.-]", "_", metric) + ".png"


def plot_metric(path: Path, jobs: list[dict[str, Any]], swept: list[str], metric: str, log_x: str = "auto") -> None:
    """One PNG: ``metric`` against the first swept parameter (the job number when nothing is swept), one line
    per combination of the other swept parameters. ``log_x``: ``auto`` (log when the positive numeric values
    span more than 10x), ``on`` or ``off``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xkey = swept[0] if swept else None
    xs_raw = [j["overrides"].get(xkey) if xkey else j["job"] for j in jobs]
    nums = [_number(x) for x in xs_raw]
    numeric = all(n is not None for n in nums)
    if numeric:
        xpos = {x: n for x, n in zip(xs_raw, nums, strict=True)}
    else:
        order = sorted({str(x) for x in xs_raw})
        xpos = {x: float(order.index(str(x))) for x in xs_raw}

    groups: dict[str, list[tuple[float, float]]] = {}
    for j, x in zip(jobs, xs_raw, strict=True):
        label = ", ".join(f"{k}={j['overrides'].get(k, '')}" for k in swept[1:])
        y = metric_value(j, metric)
        if y is not None:
            groups.setdefault(label, []).append((xpos[x], y))

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for label, pts in groups.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label or None)
    if not groups:
        ax.text(0.5, 0.5, f"no job has {metric}", ha="center", va="center", transform=ax.transAxes)
    if numeric:
        positive = [n for n in nums if n is not None and n > 0]
        span = len(positive) == len(nums) and positive and max(positive) / min(positive) > 10
        if log_x == "on" or (log_x == "auto" and span):
            if positive and len(positive) == len(nums):
                ax.set_xscale("log")
    else:
        order = sorted({str(x) for x in xs_raw})
        ax.set_xticks(range(len(order)))
        ax.set_xticklabels(order, rotation=20, ha="right")
    ax.set_xlabel(xkey or "job")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs {xkey or 'job'}")
    ax.grid(True, alpha=0.3)
    if any(groups) and len(groups) > 1:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def report(sweep: Path, out: Path | None = None, metrics: list[str] | None = None, log_x: str = "auto") -> dict:
    """Read the sweep, write ``report.md``, ``report.csv`` and the PNGs into ``out`` (default ``sweep``).

    Returns ``{"jobs", "swept", "best", "rank_metric", "optuna", "markdown", "md", "csv", "plots"}`` (``optuna``:
    :func:`read_optuna`, None for a sweep without ``optimization_results.yaml``).

    Raises:
        ProjectError: a path without any job folder (exit 2).
        FileSystemError: ``out`` cannot be created or written, named as ``--out`` (exit statuses 4-8).
    """
    sweep = Path(sweep)
    job_dirs = find_jobs(sweep)
    out = Path(out) if out is not None else sweep
    check_writable_folder("--out", str(out))  # before reading the jobs' event files
    out.mkdir(parents=True, exist_ok=True)
    jobs = [read_job(d) for d in job_dirs]
    swept = swept_keys(jobs)
    best, rank_metric = best_job(jobs)
    optuna = read_optuna(sweep, jobs)
    text = markdown_table(jobs, swept, best, rank_metric, optuna)
    (out / "report.md").write_text(f"# Sweep report: {sweep}\n\n" + text)
    write_csv(out / "report.csv", jobs, swept, best)
    if metrics is None:
        metrics = [
            m for m in DEFAULT_METRICS if m not in OPTIONAL_METRICS or any(metric_value(j, m) is not None for j in jobs)
        ]
    plots = []
    for metric in metrics:
        path = out / metric_filename(metric)
        plot_metric(path, jobs, swept, metric, log_x)
        plots.append(path)
    return {
        "jobs": jobs,
        "swept": swept,
        "best": best,
        "rank_metric": rank_metric,
        "optuna": optuna,
        "markdown": text,
        "md": out / "report.md",
        "csv": out / "report.csv",
        "plots": plots,
    }
