"""Run every benchmark once, one after the other (never in parallel: they measure the same CPU), writing
``<out>/<name>.json`` and echoing each table. ``--quick`` is the documented ~10-minute run behind
docs/benchmarks.md; ``--quick --smoke`` proves that all of them run (CI).

    python benchmarks/run_all.py --quick --out benchmarks/results
    python benchmarks/run_all.py --quick --smoke --out /tmp/bench
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["train_overhead.py", "data_pipeline.py", "sampling_speed.py", "precision.py", "memory.py"]


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
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{script} failed:\n{proc.stderr[-3000:]}")
        table = [
            ln
            for ln in proc.stdout.splitlines()
            if not ln.startswith(("Done in", "  checkpoint", "  samples", "  tensorboard")) and ln.strip()
        ]
        print("\n".join(table[-40:]))
        print(f"({time.perf_counter() - start:.0f} s)", flush=True)
    print(f"\nall benchmarks: {time.perf_counter() - total:.0f} s", flush=True)


if __name__ == "__main__":
    main()
