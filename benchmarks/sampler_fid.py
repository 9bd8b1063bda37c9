"""Sample quality against network evaluations (issue #17): one checkpoint, the same seeds, 1,000 samples per arm, scored
with the project's classifier FID (and its real-vs-real floor) and confident fraction, for

* ``ddpm``: ancestral sampling respaced to S steps (``sampler=ddpm sampler.steps=S``, fixed_small);
* ``ddim0`` / ``ddim1``: DDIM with eta = 0 and eta = 1 (``sampler=ddim sampler.eta=...``, leading spacing);
* ``dpmpp``: DPM-Solver++(2M) (``sampler=dpmpp``, trailing spacing);
* ``dpmpp_sde``: its SDE form (``sampler=dpmpp sampler.algorithm=sde-dpmsolver++``);

at S = 10, 20, 50 and 100 (S network evaluations per sample: none of these samplers calls the network twice a step).
Every arm runs ``ddpm-evaluate``'s own code path (the real ``conf/evaluate.yaml`` composed with the arm's overrides),
so its ``metrics.json`` is what a user gets from

    ddpm-evaluate ckpt_path=<ckpt> sampler=dpmpp sampler.steps=20 num_samples=1000 data.root=../shared/data

Usage::

    python benchmarks/sampler_fid.py --ckpt <run>/checkpoints/last.ckpt --data-root ../shared/data  # ~20-30 min, 2 CPUs
    python benchmarks/sampler_fid.py --ckpt ... --steps 10 20 --samplers dpmpp --num-samples 200     # a quick look

Writes ``benchmarks/results/sampler_fid.json`` (every arm's metrics) and ``docs/images/sampler_fid.png`` (FID against
network evaluations, log x, the floor as a dashed line), and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import write_rows  # noqa: E402

SAMPLERS = {
    "ddpm": ["sampler=ddpm"],
    "ddim0": ["sampler=ddim", "sampler.eta=0.0"],
    "ddim1": ["sampler=ddim", "sampler.eta=1.0"],
    "dpmpp": ["sampler=dpmpp"],
    "dpmpp_sde": ["sampler=dpmpp", "sampler.algorithm=sde-dpmsolver++"],
}
LABELS = {
    "ddpm": "DDPM (respaced)",
    "ddim0": "DDIM eta=0",
    "ddim1": "DDIM eta=1",
    "dpmpp": "DPM-Solver++(2M)",
    "dpmpp_sde": "SDE-DPM-Solver++(2M)",
}
KEPT = ("fid", "fid_floor", "confident_fraction", "inception_score", "normalised_entropy", "seconds")


def run_arm(
    ckpt: str, data_root: str, sampler: str, steps: int, num_samples: int, batch_size: int, seed: int, out_dir: Path
) -> dict:
    from ddpm_lightning.config import compose_config
    from ddpm_lightning.evaluation import evaluate

    cfg = compose_config(
        "evaluate",
        [
            f"ckpt_path={ckpt}",
            *SAMPLERS[sampler],
            f"sampler.steps={steps}",
            f"num_samples={num_samples}",
            f"batch_size={batch_size}",
            f"seed={seed}",
            f"data.root={data_root}",
            f"out_dir={out_dir}",
            "overwrite=true",
        ],
    )
    start = time.perf_counter()
    metrics = evaluate(cfg)
    return {
        "sampler": sampler,
        "steps": steps,
        "nfe": steps,
        **{k: metrics.get(k) for k in KEPT},
        "wall_seconds": time.perf_counter() - start,
    }


def table(rows: list[dict]) -> str:
    lines = ["| sampler | steps (NFE) | FID | confident | seconds |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(
            f"| {LABELS[r['sampler']]} | {r['steps']} | {r['fid']:.2f} | {r['confident_fraction']:.3f} | "
            f"{r['wall_seconds']:.0f} |"
        )
    floor = rows[0].get("fid_floor") if rows else None
    return "\n".join(lines) + (f"\n\nFID floor (real test vs real train): {floor:.2f}" if floor is not None else "")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name in SAMPLERS:
        arm = sorted((r for r in rows if r["sampler"] == name), key=lambda r: r["nfe"])
        if arm:
            ax.plot([r["nfe"] for r in arm], [r["fid"] for r in arm], marker="o", label=LABELS[name])
    floor = next((r["fid_floor"] for r in rows if r.get("fid_floor") is not None), None)
    if floor is not None:
        ax.axhline(floor, color="grey", linestyle="--", label=f"floor (real vs real) {floor:.2f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks([10, 20, 50, 100])
    ax.set_yticks([2, 5, 10, 20, 50])
    ax.set_xlabel("network evaluations per sample")
    ax.set_ylabel("classifier FID (1,000 samples)")
    ax.set_title("FID against network evaluations, experiment=mnist_cpu")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS))
    p.add_argument("--steps", nargs="+", type=int, default=[10, 20, 50, 100])
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sampler_fid.json"))
    p.add_argument("--plot", default=str(ROOT / "docs" / "images" / "sampler_fid.png"))
    p.add_argument("--append", action="store_true", help="add to the rows already in --out (other arms)")
    args = p.parse_args()
    rows = json.loads(Path(args.out).read_text())["rows"] if args.append and Path(args.out).is_file() else []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.samplers:
            for steps in args.steps:
                row = run_arm(
                    args.ckpt,
                    args.data_root,
                    name,
                    steps,
                    args.num_samples,
                    args.batch_size,
                    args.seed,
                    Path(tmp) / f"{name}_{steps}",
                )
                rows.append(row)
                print(json.dumps(row), flush=True)
                write_rows(args.out, {"ckpt": args.ckpt, "num_samples": args.num_samples, "seed": args.seed}, rows)
    plot(rows, Path(args.plot))
    print(table(rows))


if __name__ == "__main__":
    main()
