"""How much of a `raydefect tune` study's wall time is spent training: prints one JSON line.

    python benchmarks/tune_overhead.py --trials 4 --epochs 3 --size 64 --images 200

A study on synthetic data with the shipped tune-demo space (tiny random-init ViTs), run by
``raydefect.pipelines.tune.tune_study`` on an embedded local Ray (started before the clock starts).

Definitions (all from what the trials record themselves, trials/<id>/metrics.csv):
  train_s       per trial, the sum over its epochs of the epoch's ``seconds`` measured inside the Ray Train worker:
                the training pass + validation of that epoch (what a trial is for)
  wall_s        the study's wall time: tune_study() from call to return (search, scheduling, trial actors,
                TorchTrainer + worker start-up, Ray Data, checkpoints and reports, trials.csv, best.yaml, plots)
  concurrency   trials run at a time (``max_concurrent_trials``)
  training_fraction = sum(train_s) / (wall_s * concurrency): the share of the study's trial slots spent training.
                1.0 would mean no overhead at all; the rest is the price of Train-inside-Tune per trial.
  trial_overhead_s  mean over trials of (trial duration - train_s): the fixed start-up/bookkeeping per trial.
On a GPU cluster with real backbones an epoch takes minutes, so the fixed per-trial overhead matters far less than
here, where a tiny model trains an epoch in about a second: read the figure as an upper bound of the overhead share.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--epochs", type=int, default=3, help="epochs per trial (tune.epochs)")
    p.add_argument("--size", type=int, default=64, help="image side of the data and the trials")
    p.add_argument("--images", type=int, default=200, help="synthetic images in total (80%% train)")
    p.add_argument("--subset", type=float, default=1.0, help="tune.subset")
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="CPUs of the embedded Ray")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--max-concurrent", type=int, default=None)
    args = p.parse_args()

    from raydefect import console
    from raydefect.config import load_config
    from raydefect.data.synth import synthetic_dataset
    from raydefect.pipelines.cluster import connect
    from raydefect.pipelines.tune import tune_study

    console.set_verbosity(-1)
    with tempfile.TemporaryDirectory(prefix="raydefect-bench-") as tmp:
        synthetic_dataset(tmp, args.images, args.size)
        sets = [
            f"data.dataset={Path(tmp) / 'ds'}",
            f"data.image_size={args.size}",
            f"train.runs_dir={Path(tmp) / 'runs'}",
            f"resources.cpus_per_worker={args.cpus_per_worker}",
            f"tune.num_samples={args.trials}",
            f"tune.epochs={args.epochs}",
            f"tune.subset={args.subset}",
            "tune.name=bench",
            "tune.space=tune-demo",
        ]
        if args.max_concurrent:
            sets.append(f"tune.max_concurrent={args.max_concurrent}")
        cfg = load_config("demo", sets=sets)
        connect(None, num_cpus=args.cpus)
        t = time.perf_counter()
        result = tune_study(cfg)
        wall = time.perf_counter() - t
        rows = [r for r in result.rows if r.epochs > 0]
        train = sum(r.train_s for r in rows)
        out = {
            "benchmark": "tune_overhead",
            "trials": len(result.rows),
            "finished": sum(r.finished for r in result.rows),
            "stopped_early": sum(r.status == "STOPPED-EARLY" for r in result.rows),
            "epochs_run": sum(r.epochs for r in result.rows),
            "image_size": args.size,
            "train_images": result.rows[0].history[0].get("train_images") if rows else None,
            "concurrency": result.concurrency,
            "cpus": args.cpus,
            "wall_s": round(wall, 1),
            "train_s": round(train, 1),
            "training_fraction": round(train / (wall * result.concurrency), 3),
            "trial_overhead_s": round(sum(r.duration_s - r.train_s for r in rows) / max(1, len(rows)), 1),
            "mean_epoch_s": round(train / max(1, sum(r.epochs for r in rows)), 2),
            "load_avg_1m": round(os.getloadavg()[0], 1),
        }
        print(json.dumps(out))


if __name__ == "__main__":
    main()
