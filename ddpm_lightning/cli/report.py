"""``ddpm-report``: summarise a Hydra multirun sweep of ``ddpm-train`` in a table and one plot per metric (an Optuna
search too: its best trial is marked and named under the table).

Usage::

    ddpm-report <sweep dir> [--out DIR] [--metric val/loss --metric fid ...] [--log-x auto|on|off]

What is read and written: :mod:`ddpm_lightning.report`. A path without any job folder: one line on stderr, exit 2.

Exit statuses when the file system refuses a path (one line naming the key, e.g. ``--out``, and the path, before any
work where it can be known): 4 permission denied, 5 read-only file system, 6 no such folder (or a path under a
regular file), 7 no space left on the device (or disk quota exceeded), 8 any other refusal of the file system.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ddpm_lightning.config import run_command


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ddpm-report", description="Summarise a ddpm-train -m sweep.")
    parser.add_argument(
        "sweep",
        type=Path,
        help="Hydra multirun directory (hydra.sweep.dir) of ddpm-train -m, "
        "an Optuna search (hparams_search=...) included",
    )
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the sweep directory)")
    parser.add_argument(
        "--metric",
        action="append",
        default=None,
        help="metric to plot, repeatable: a TensorBoard tag (val/loss, val/loss_q0, train/loss_epoch) or a "
        "metrics.json key (fid, inception_score); default: val/loss, val/loss_q0..q3 and fid when present",
    )
    parser.add_argument("--log-x", choices=["auto", "on", "off"], default="auto", help="log scale of the x axis")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    from ddpm_lightning.report import report  # matplotlib, torch, TensorBoard: after the command line is parsed

    result = report(args.sweep, args.out, args.metric, args.log_x)
    print(result["markdown"])
    for key in ("md", "csv"):
        print(f"wrote {result[key]}")
    for path in result["plots"]:
        print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns 0, or exits with one ``error:`` line: status 2 when the path is not a sweep, 4-8
    when the file system refuses the output folder (``--out``, default the sweep folder)."""
    return run_command(run, parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
