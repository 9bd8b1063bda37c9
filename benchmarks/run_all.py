"""Run every benchmark once, one after the other (never in parallel: they measure the same CPU), writing
``<out>/<name>.json`` and echoing each table, each script in a process of its own. ``--quick`` is the documented
~10-minute run behind docs/benchmarks.md; ``--quick --smoke`` proves that all of them run (CI), all in this one process
(a proof, not a measurement: one interpreter's imports instead of five, ~45 s of CPU on 2 cores).

    python benchmarks/run_all.py --quick --out benchmarks/results
    python benchmarks/run_all.py --quick --smoke --out /tmp/bench
"""

from __future__ import annotations

import argparse
import contextlib
import io
import runpy
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["train_overhead.py", "data_pipeline.py", "sampling_speed.py", "precision.py", "memory.py"]


def _run_here(script: Path, argv: list[str]) -> str:
    """``python <script> <argv>`` run as ``__main__`` in this process (``sys.argv`` and ``sys.path`` restored after);
    returns what it printed. A non-zero exit ends run_all with the script's name."""
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    out = io.StringIO()
    try:
        sys.argv = [str(script), *argv]
        sys.path.insert(0, str(script.parent))
        with contextlib.redirect_stdout(out):
            runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exited:
        if exited.code not in (None, 0):
            print(out.getvalue()[-3000:])
            sys.exit(f"{script.name} failed: {exited.code}")
    finally:
        sys.argv[:], sys.path[:] = saved_argv, saved_path
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--only", default=",".join(SCRIPTS), help="comma-separated subset of " + ", ".join(SCRIPTS))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    flags = [f for f, on in (("--quick", args.quick), ("--smoke", args.smoke)) if on]
    if args.smoke and "train_overhead.py" in args.only:
        flags_train = [*flags, "--batch-size", "8"]
    else:
        flags_train = flags
    total = time.perf_counter()
    for script in args.only.split(","):
        start = time.perf_counter()
        cmd = [
            sys.executable,
            str(HERE / script),
            *(flags_train if script == "train_overhead.py" else flags),
            "--json",
            str(out / script.replace(".py", ".json")),
        ]
        print(f"\n== {' '.join(cmd[1:])}", flush=True)
        if args.smoke:  # proof that each runs, not a measurement: this process, without 11 s of imports per script
            stdout = _run_here(Path(cmd[1]), cmd[2:])
        else:
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{script} failed:\n{proc.stderr[-3000:]}")
            stdout = proc.stdout
        table = [
            ln
            for ln in stdout.splitlines()
            if not ln.startswith(("Done in", "  checkpoint", "  samples", "  tensorboard")) and ln.strip()
        ]
        print("\n".join(table[-40:]))
        print(f"({time.perf_counter() - start:.0f} s)", flush=True)
    print(f"\nall benchmarks: {time.perf_counter() - total:.0f} s", flush=True)


if __name__ == "__main__":
    main()
