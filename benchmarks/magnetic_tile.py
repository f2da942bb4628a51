"""Train on the real magnetic tile data set from scratch within a CPU budget; print one JSON line of test metrics.

    python benchmarks/magnetic_tile.py ../shared/datasets/magnetic_tile --out runs-mt

Steps (what a user types, see README "Training"):

1. ``raydefect prepare`` with the generic importer (``MT_<Class>/Imgs/<name>.jpg``, mask ``<name>.png`` beside it,
   ``MT_Free`` = normal) into ``OUT/dataset`` (skipped when it is there already);
2. ``raydefect train`` on Ray Train (one worker) into ``OUT/runs/<name>/``.

No pretrained weights: this machine has no internet, so the backbone is the small random-init ``tiny`` ViT (96-dim,
4 blocks, 8 px patches) trained FROM SCRATCH -- full fine-tuning only (freezing a random backbone is pointless).
Expect far better numbers from a pretrained DINOv3 backbone; this measures the pipeline on real images within a
fixed budget: by default 36 epochs at 96 px on one CPU core with one torch thread, about 20 CPU-minutes (one thread
also keeps OpenMP from stalling when other jobs share the cores). The JSON line reports the CPU seconds used.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def train_args(dataset: Path, runs: Path, args: argparse.Namespace) -> list[str]:
    """The `raydefect train` arguments of this benchmark (printed so the run can be repeated by hand)."""
    return [
        "train",
        "--data",
        str(dataset),
        "--name",
        args.name,
        "--backbone",
        args.backbone,
        "--image-size",
        str(args.size),
        "--epochs",
        str(args.epochs) if args.pretrained else f"0,0,{args.epochs}",  # pretrained: the three stages
        "--batch-size",
        str(args.batch_size),
        "--lr",
        str(args.lr),
        "--cpus-per-worker",
        str(args.cpus),
        "--set",
        f"model.pretrained={'true' if args.pretrained else 'false'}",
        "--set",
        f"optim.head_lr={args.lr}",
        "--set",
        "optim.weight_decay=0.05",
        "--set",
        "model.drop_path_rate=0.0",
        "--set",
        "schedule.warmup_epochs=1",
        "--set",
        "data.loader_threads=1",
        "--set",
        f"train.runs_dir={runs}",
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", type=Path, help="the magnetic tile folder (holds MT_Blowhole, ..., MT_Free)")
    p.add_argument("--out", type=Path, default=Path("runs-magnetic-tile"), help="dataset and runs go here")
    p.add_argument("--name", default="mt-tiny-scratch")
    p.add_argument("--backbone", default="tiny")
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--epochs", type=int, default=36)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--cpus", type=int, default=1, help="CPUs of the worker = torch threads")
    p.add_argument(
        "--pretrained",
        action="store_true",
        help="load the backbone's pretrained weights (hub or cache) and train "
        "the three stages; needs the weights, which this project's machines cannot download",
    )
    args = p.parse_args()

    def raydefect(*cli_args: str) -> None:
        print("raydefect " + " ".join(f"'{a}'" if " " in a or "*" in a else a for a in cli_args), flush=True)
        subprocess.run([sys.executable, "-m", "raydefect.cli", *cli_args], check=True)

    out = args.out.absolute()
    dataset, runs = out / "dataset", out / "runs"
    if not (dataset / "manifest.parquet").is_file():
        prepare = ["prepare", "--images", f"{args.source.absolute()}/MT_*/Imgs/*.jpg"]
        prepare += ["--mask-template", "{parent}/{stem}.png", "--class-regex", r"MT_(\w+)/", "--normal-class", "Free"]
        prepare += ["--out", str(dataset)]
        raydefect(*prepare)
    start = time.perf_counter()
    raydefect(*train_args(dataset, runs, args))
    seconds = time.perf_counter() - start
    from raydefect.engine.run import read_metrics_csv

    run = runs / args.name
    epochs = read_metrics_csv(run / "metrics.csv")
    test = json.loads((run / "test_metrics.json").read_text())
    metrics = test["metrics"]
    keys = ("f1", "precision", "recall", "auroc", "ap", "class_accuracy", "iou", "dice", "pixel_auroc", "aupro")
    print(
        json.dumps(
            {
                "benchmark": "magnetic_tile",
                "backbone": args.backbone,
                "pretrained": args.pretrained,
                "image_size": args.size,
                "epochs": args.epochs,
                "wall_s": round(seconds, 1),  # this call (a re-run of a finished run only re-exports)
                "train_s": round(sum(r["seconds"] for r in epochs), 1),
                "train_cpu_s": round(sum(r["cpu_seconds"] for r in epochs), 1),  # the budget: CPU time of training
                "best_epoch": test["checkpoint_epoch"],
                "test_images": test["image"]["n_images"],
                "thresholds": test["thresholds"],
                **{f"test_{k}": round(metrics[f"test_{k}"], 4) for k in keys if metrics.get(f"test_{k}") is not None},
                "per_class_accuracy": {
                    k: (None if v is None else round(v, 3)) for k, v in test["image"]["per_class_accuracy"].items()
                },
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
