"""Validation AUROC and IoU against cumulative training CPU-minutes, one line per run; writes a PNG.

    python benchmarks/learning_curve.py runs-mt/runs/mt-scratch [more run folders] --out benchmarks/mt_curve.png

Reads each run's ``metrics.csv`` (``cpu_seconds`` per epoch: the training worker's CPU time, all threads) and its
``test_metrics.json`` (the test split at the best epoch, marked on the curve).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from raydefect.engine.run import read_metrics_csv

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", type=Path, nargs="+")
    p.add_argument("--out", type=Path, default=Path("learning_curve.png"))
    args = p.parse_args()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for run in args.runs:
        rows = read_metrics_csv(run / "metrics.csv")
        minutes, total = [], 0.0
        for r in rows:
            total += r["cpu_seconds"] / 60
            minutes.append(total)
        test_file = run / "test_metrics.json"
        test = json.loads(test_file.read_text()) if test_file.is_file() else None
        for ax, key in zip(axes, ("auroc", "iou"), strict=True):
            ax.plot(minutes, [r[f"val_{key}"] for r in rows], marker=".", label=f"{run.name} (validation)")
            if test is not None:
                best = test["checkpoint_epoch"]
                ax.scatter(
                    [minutes[best - 1]], [test["metrics"][f"test_{key}"]], marker="*", s=120, label=f"{run.name} test"
                )
    for ax, title in zip(axes, ("image AUROC", "defect-image IoU"), strict=True):
        ax.set_xlabel("training CPU-minutes")
        ax.set_title(title)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(args.out)


if __name__ == "__main__":
    main()
