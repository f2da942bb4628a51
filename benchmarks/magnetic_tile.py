"""Train on the real magnetic tile data set from scratch within a CPU budget; print one JSON line of test metrics.

    python benchmarks/magnetic_tile.py ../shared/datasets/magnetic_tile --out runs-mt

Steps (what a user types, see docs/guides/train.md):

1. ``raydefect prepare`` with the generic importer (``MT_<Class>/Imgs/<name>.jpg``, mask ``<name>.png`` beside it,
   ``MT_Free`` = normal) into ``OUT/dataset`` (skipped when it is there already);
2. ``raydefect train`` on Ray Train (one worker) into ``OUT/runs/<name>/``.

3. the test split is evaluated by the training run itself (``test_metrics.json``), with the thresholds chosen on
   the validation split.

No pretrained weights: the recipe is ``--config scratch`` (configs/scratch.yaml), a timm CNN trained from random
init on the 2-core CPU. The JSON line reports the test metrics, the resolved recipe, and the CPU seconds of the
whole training command (driver, Ray and its workers: ``getrusage(RUSAGE_CHILDREN)``), the budget the issue sets.
Other rows of the docs' table: ``--backbone``, ``--size``, ``--epochs`` or ``--set KEY=VALUE`` on top of the
recipe. Run it niced in the background: ``nice -n 10 python benchmarks/magnetic_tile.py ... > mt.log 2>&1 &``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def train_args(dataset: Path, runs: Path, args: argparse.Namespace) -> list[str]:
    """The `raydefect train` arguments of this benchmark (printed so the run can be repeated by hand): the shipped
    recipe (``--config scratch``), with only what the command line of this script changes."""
    out = ["train", "--data", str(dataset), "--name", args.name, "--config", args.config]
    for flag, value in (("--backbone", args.backbone), ("--image-size", args.size), ("--epochs", args.epochs)):
        if value is not None:
            out += [flag, str(value)]
    out += ["--cpus-per-worker", str(args.cpus), "--set", f"train.runs_dir={runs}"]
    if args.pretrained:
        out += ["--set", "model.pretrained=true"]
    for item in args.set:
        out += ["--set", item]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", type=Path, help="the magnetic tile folder (holds MT_Blowhole, ..., MT_Free)")
    p.add_argument("--out", type=Path, default=Path("runs-magnetic-tile"), help="dataset and runs go here")
    p.add_argument("--name", default="mt-scratch")
    p.add_argument("--config", default="scratch", help="the recipe: a shipped config name or a YAML path")
    p.add_argument("--backbone", help="override the recipe's model.backbone")
    p.add_argument("--size", type=int, help="override the recipe's data.image_size")
    p.add_argument("--epochs", type=int, help="override the recipe's epochs")
    p.add_argument("--cpus", type=int, default=1, help="CPUs of the worker = torch threads (1: no OpenMP spinning)")
    p.add_argument("--set", action="append", default=[], help="any other config key, KEY=VALUE (repeatable)")
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
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    raydefect(*train_args(dataset, runs, args))
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    seconds = time.perf_counter() - start
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    import yaml

    from raydefect.engine.run import read_metrics_csv

    run = runs / args.name
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    epochs = read_metrics_csv(run / "metrics.csv")
    test = json.loads((run / "test_metrics.json").read_text())
    metrics = test["metrics"]
    keys = ("f1", "precision", "recall", "auroc", "ap", "class_accuracy", "iou", "dice", "pixel_auroc", "aupro")
    print(
        json.dumps(
            {
                "benchmark": "magnetic_tile",
                "config": args.config,
                "backbone": cfg["model"]["backbone"],
                "pretrained": cfg["model"]["pretrained"],
                "image_size": cfg["data"]["image_size"],
                "epochs": len(epochs),
                "wall_s": round(seconds, 1),  # this call (a re-run of a finished run only re-exports)
                "cpu_s": round(cpu, 1),  # the whole command: driver, Ray, workers
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
