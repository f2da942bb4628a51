"""Scoring speed and memory of the three input geometries on camera-size JPEGs; one JSON line per setting.

    nice python benchmarks/geometry_speed.py                       # 2 and 12 megapixels, every geometry
    nice python benchmarks/geometry_speed.py --mp 2 --geometry tiles --images 8
    nice python benchmarks/geometry_speed.py --mp 20 --geometry tiles --images 12 --pipeline-only

For each geometry (square, aspect, tiles) and image size it saves a random-init model (``--backbone``, input
``--input`` px; weights do not change the speed), writes ``--images`` synthetic JPEGs with small defects, and in a
fresh process (so peak RSS is that setting's own) runs:

  score     `BatchScorer` end to end, as one `raydefect score` replica does: read, decode, resize or tile, model,
            stitch, masks at each image's own size as PNG -- images/s and megapixels/s, peak RSS;
  bare      the model alone on the very inputs score gave it (for tiles: every tile, cut and normalised beforehand),
            in batches of ``--batch``: the ceiling. ``score / bare`` is the share of the model's speed the whole
            path keeps (the issue's target for tiles: >= 0.85 on this CPU);
  pipeline  (``--pipeline``) `raydefect score` itself on the same images and model, in a subprocess on an
            embedded Ray with one model replica (Ray Data streaming, Parquet commits): images/s, and the peak
            summed RSS of its whole process tree (driver, Ray's own processes, the workers), sampled every 0.2 s,
            overall and in each quarter of the run (flat quarters: memory does not grow with the images scored).
            fp32, like the other two. ``--pipeline-only`` skips score and bare (many large images, memory only).

Torch runs ``--threads`` threads (default 1, which keeps OpenMP from spinning on a shared machine).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {2: (1632, 1224), 12: (4000, 3000), 20: (5472, 3648)}


def run_one(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from raydefect.config import ModelConfig
    from raydefect.data.synth import generate_archive
    from raydefect.geometry import Geometry, predict_tiled
    from raydefect.imaging import decode_image
    from raydefect.inference import Predictor, Preprocessor, resize_rgb
    from raydefect.models.artifact import save_artifact
    from raydefect.models.model import DefectModel
    from raydefect.scoring.scorer import BatchScorer

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    w, h = SIZES[args.mp]
    archive = work / f"archive-{args.mp}mp"
    if not archive.is_dir():
        generate_archive(archive, args.images, (w, h), seed=0, n_corrupt=0, defect_size=160, workers=1)
    paths = sorted(str(p) for p in archive.rglob("*") if p.suffix in (".jpg", ".png"))[: args.images]
    overlap = args.input // 8
    g = Geometry(args.geometry, args.input, 1.0, overlap) if args.geometry == "tiles" else None
    geometry = g or Geometry(args.geometry, args.input)
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=args.backbone, pretrained=False)
    model = DefectModel(cfg, args.input, ("normal", "defect"), geometry=geometry).eval()
    artifact = work / f"model-{args.geometry}"
    save_artifact(model, artifact, thresholds={"image": 0.5, "pixel": 0.5})

    if args.pipeline_only:
        return {
            "benchmark": "geometry_speed",
            "geometry": args.geometry,
            "megapixels_per_image": round(w * h / 1e6, 1),
            "backbone": args.backbone,
            "input": args.input,
            **run_pipeline(args, artifact, archive, w * h / 1e6, None),
        }
    scorer = BatchScorer(str(artifact), device="cpu", precision="fp32")
    scorer.score(paths[:1], batch_size=args.batch)  # warm-up outside the measured window
    start = time.perf_counter()
    table = scorer.score(paths, batch_size=args.batch)
    score_s = time.perf_counter() - start
    assert table.num_rows == len(paths) and not any(table.column("error").to_pylist())

    predictor = Predictor(str(artifact), device="cpu", precision="fp32")
    pre = Preprocessor(predictor.meta)
    images = [decode_image(p) for p in paths]
    if geometry.tiled:
        cut: list = []

        def collect(x: np.ndarray) -> dict:
            cut.append(x)
            n = len(x)
            return {
                "defect_score": np.zeros(n),
                "class_probs": np.zeros((n, 2)),
                "mask_prob": np.zeros((n, *x.shape[2:])),
            }

        predict_tiled(images, geometry, pre.normalize_tiles, collect, batch_size=args.batch)
        inputs = np.concatenate(cut)
    else:
        inputs = np.stack([pre.normalize(resize_rgb(im, args.input, args.geometry)) for im in images])
    start = time.perf_counter()
    for i in range(0, len(inputs), args.batch):
        predictor.predict(inputs[i : i + args.batch])
    bare_s = time.perf_counter() - start
    megapixels = len(paths) * w * h / 1e6
    return {
        "benchmark": "geometry_speed",
        "geometry": args.geometry,
        "megapixels_per_image": round(w * h / 1e6, 1),
        "images": len(paths),
        "model_inputs": len(inputs),
        "backbone": args.backbone,
        "input": args.input,
        "threads": args.threads,
        "score_images_per_s": round(len(paths) / score_s, 3),
        "score_megapixels_per_s": round(megapixels / score_s, 2),
        "bare_inputs_per_s": round(len(inputs) / bare_s, 2),
        "score_over_bare": round(bare_s / score_s, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 0),
        **(run_pipeline(args, artifact, archive, w * h / 1e6, score_s) if args.pipeline else {}),
    }


def run_pipeline(args: argparse.Namespace, artifact: Path, archive: Path, mp: float, score_s: float | None) -> dict:
    """`raydefect score` end to end on every image in `archive` (`mp` megapixels each), with its process tree's peak
    RSS; ``pipeline / score`` compares its images/s with one `BatchScorer`'s (`score_s` for the same images)."""
    import psutil

    n = sum(1 for p in archive.rglob("*") if p.suffix in (".jpg", ".png"))
    out = Path(args.work) / f"scores-{args.geometry}-{args.mp}mp"
    cmd = [sys.executable, "-m", "raydefect.cli", "score", "--model", str(artifact), "--input", str(archive)]
    cmd += ["--out", str(out), "--rescore", "--actors", "1", "--batch-size", str(args.batch), "--engine", "torch"]
    cmd += ["--set", "score.precision=fp32"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    root, samples = psutil.Process(proc.pid), []
    while proc.poll() is None:
        total = 0
        for p in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):  # a process that ended between the listing and the reading
                total += p.memory_info().rss
        samples.append((time.perf_counter() - start, total))
        time.sleep(0.2)
    wall = time.perf_counter() - start
    quarters = [max((r for t, r in samples if q * wall / 4 <= t < (q + 1) * wall / 4), default=0) for q in range(4)]
    err = proc.stderr.read() if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"raydefect score failed ({proc.returncode}):\n{err[-2000:]}")
    return {
        "pipeline_images": n,
        "pipeline_wall_s": round(wall, 1),
        "pipeline_images_per_s": round(n / wall, 3),
        "pipeline_megapixels_per_s": round(n * mp / wall, 2),
        "pipeline_over_score": round(score_s / wall, 3) if score_s and n == args.images else None,
        "pipeline_peak_tree_rss_mb": round(max(quarters) / 2**20, 0),
        "pipeline_peak_tree_rss_mb_by_quarter": [round(r / 2**20, 0) for r in quarters],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mp", type=int, nargs="*", default=[2, 12], choices=sorted(SIZES))
    p.add_argument("--geometry", nargs="*", default=["square", "aspect", "tiles"])
    p.add_argument("--images", type=int, default=6)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--input", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default=None, help="folder for images and models (default: a temporary one)")
    p.add_argument("--pipeline", action="store_true", help="also run `raydefect score` (Ray) on the same images")
    p.add_argument("--pipeline-only", action="store_true", help="run only `raydefect score` (Ray), no score / bare")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # internal: run one setting here
    args = p.parse_args()
    if args.one:
        args.mp, args.geometry = args.mp[0], args.geometry[0]
        print(json.dumps(run_one(args)), flush=True)
        return
    work = args.work or tempfile.mkdtemp(prefix="geometry-speed-")
    for mp in args.mp:
        for geometry in args.geometry:
            cmd = [sys.executable, __file__, "--one", "--mp", str(mp), "--geometry", geometry, "--work", work]
            cmd += ["--images", str(args.images), "--backbone", args.backbone, "--input", str(args.input)]
            cmd += ["--batch", str(args.batch), "--threads", str(args.threads), *(["--pipeline"] * args.pipeline)]
            cmd += ["--pipeline-only"] * args.pipeline_only
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
            print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
