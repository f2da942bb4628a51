"""Small defects in camera-size images: a tiled model against the squashed one, same budget; one JSON line.

    nice python benchmarks/tiles_vs_square.py --out runs-tiles

Steps, as a user types them:

1. ``raydefect synth`` camera-size images (``--size``, default 1280x960) with small defects (``--defect-size 160``:
   scratches and cracks 3-8 px wide), then ``raydefect prepare``;
2. ``raydefect train --config scratch`` twice with the same backbone, input side, batch, epochs and seed -- once
   ``data.geometry=square`` (the whole image squashed to ``--input`` px), once ``data.geometry=tiles`` (one
   ``--input`` px tile per image and epoch at native pixels, half of them centred on a defect);
3. ``raydefect evaluate`` both on the test split: pixel IoU and Dice against the true masks at each image's own
   size, image AUROC.

The target (issue: tiles in training, scoring, predict, evaluate and export) is a tiled test IoU of at least twice
the squashed one. Both runs see the same number of pixels per step, so the budget is the same.
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs-tiles"))
    p.add_argument("--size", default="1280x960", help="synthetic image size, WIDTHxHEIGHT")
    p.add_argument("--defect-size", type=int, default=160)
    p.add_argument("--per-class", type=int, default=30)
    p.add_argument("--normal", type=int, default=60)
    p.add_argument("--backbone", default="resnet10t")
    p.add_argument("--input", type=int, default=256, help="the model's input side: the squashed image or a tile")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--cpus", type=int, default=1)
    p.add_argument("--set", action="append", default=[], help="another config key for both runs, KEY=VALUE")
    args = p.parse_args()

    def raydefect(*cli_args: str) -> None:
        print("raydefect " + " ".join(cli_args), flush=True)
        subprocess.run([sys.executable, "-m", "raydefect.cli", *cli_args], check=True)

    out = args.out.absolute()
    raw, dataset, runs = out / "raw", out / "dataset", out / "runs"
    if not (dataset / "manifest.parquet").is_file():
        raydefect(
            "synth", str(raw), "--per-class", str(args.per_class), "--normal", str(args.normal), "--size", args.size,
            "--defect-size", str(args.defect_size), "--seed", "0", "--workers", "1", "--overwrite",
        )  # fmt: skip
        raydefect(
            "prepare", "--defect-images", str(raw / "defect_images"), "--defect-masks", str(raw / "defect_masks"),
            "--normal-images", str(raw / "normal_images"), "--out", str(dataset), "--workers", "1",
        )  # fmt: skip
    results = {}
    for geometry in ("square", "tiles"):
        name = f"{geometry}-{args.backbone}-{args.input}"
        size_key = "data.tile_size" if geometry == "tiles" else "data.image_size"
        start, cpu0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        raydefect(
            "train", "--data", str(dataset), "--name", name, "--config", "scratch", "--backbone", args.backbone,
            "--epochs", str(args.epochs), "--cpus-per-worker", str(args.cpus), "--set", f"train.runs_dir={runs}",
            "--set", f"data.geometry={geometry}", "--set", f"{size_key}={args.input}", "--set", "data.scale=1.0",
            "--set", f"data.tile_overlap={args.input // 8}", *(x for kv in args.set for x in ("--set", kv)),
        )  # fmt: skip
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        report = out / "eval" / name
        raydefect("evaluate", "--model", str(runs / name / "model"), "--data", str(dataset), "--out", str(report))
        headline = json.loads((report / "metrics.json").read_text())["headline"]
        results[geometry] = {
            "test_iou": headline["iou"],
            "test_dice": headline["dice"],
            "test_auroc": headline["auroc"],
            "train_wall_s": round(time.perf_counter() - start, 1),
            "driver_cpu_s": round((cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime), 1),
        }
    sq, ti = results["square"]["test_iou"], results["tiles"]["test_iou"]
    print(
        json.dumps(
            {
                "benchmark": "tiles_vs_square",
                "images": args.size,
                "defect_size": args.defect_size,
                "backbone": args.backbone,
                "input": args.input,
                "epochs": args.epochs,
                **results,
                "iou_ratio_tiles_over_square": None if not sq else round(ti / sq, 2),
                "target": ">= 2",
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
