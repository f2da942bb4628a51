"""How fast `raydefect predict` is on this machine: prints one JSON line.

    python benchmarks/predict_speed.py --backbone tiny --size 64 --images 2000
    python benchmarks/predict_speed.py --backbone dinov3-s --size 224 --images 300 --source 'magnetic_tile/*/Imgs/*.jpg'

A random-init model of the given backbone (weights do not change the speed) is saved as an artifact into a
temporary folder; the images are synthetic ones of --image-px (default: --size) written there too, or the files of
--source (a glob; not copied). Side by side, as docs/architecture.md's performance method asks:

  ceiling    the bare model forward on pre-decoded, pre-normalised tensors (batch --batch-size), at 1 thread and at
             PyTorch's default, the better of the two
  predict    `predict_images` with overlays (the command as people run it) and with --no-overlays (CSV only)
  naive      one image at a time: decode, forward, postprocess, overlay, write (the obvious loop, PyTorch's default
             threads)

CPU seconds are reported too: on a shared machine they move much less than wall time.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from raydefect import console
from raydefect.config import ModelConfig
from raydefect.data.synth import generate_archive
from raydefect.imaging import decode_image
from raydefect.inference import Predictor, Preprocessor, decide, postprocess
from raydefect.models.artifact import save_artifact
from raydefect.models.model import DefectModel
from raydefect.tasks.predict import predict_images
from raydefect.viz.overlay import render_overlay, save_png


def _cpu_s() -> float:
    me = resource.getrusage(resource.RUSAGE_SELF)
    return me.ru_utime + me.ru_stime


def _timed(fn) -> tuple[float, float]:
    t, c = time.perf_counter(), _cpu_s()
    fn()
    return time.perf_counter() - t, _cpu_s() - c


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="tiny")
    p.add_argument("--size", type=int, default=64, help="model input size")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--image-px", type=int, default=None, help="side of the synthetic images (default: --size)")
    p.add_argument("--source", default=None, help="glob of real images to use instead of synthetic ones")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--naive", type=int, default=100, help="images for the one-at-a-time run (0: skip)")
    args = p.parse_args()
    console.set_verbosity(-1)
    with tempfile.TemporaryDirectory(prefix="raydefect-bench-") as tmp:
        torch.manual_seed(0)
        cfg = ModelConfig(backbone=args.backbone, pretrained=False)
        model = DefectModel(cfg, args.size, ["normal", "scratch", "spot"], load_weights=False).eval()
        save_artifact(model, Path(tmp) / "model", thresholds={"image": 0.5, "pixel": 0.5})
        if args.source:
            files = sorted(glob.glob(os.path.expanduser(args.source), recursive=True))[: args.images]
        else:
            arc = generate_archive(Path(tmp) / "images", args.images, args.image_px or args.size, seed=0, n_corrupt=0)
            files = sorted(glob.glob(f"{arc['out']}/**/*.*", recursive=True))
        predictor = Predictor(Path(tmp) / "model", device="cpu")
        pre = Preprocessor(predictor.meta)
        sample = np.stack([pre(decode_image(f)) for f in files[: args.batch_size]])
        predictor.predict(sample)  # warm-up

        reps = max(1, 256 // args.batch_size)
        default_threads = torch.get_num_threads()
        ceilings = {}
        for threads in sorted({1, default_threads}):  # the forward's best setting is its ceiling
            torch.set_num_threads(threads)
            fwd_s, _ = _timed(lambda: [predictor.predict(sample) for _ in range(reps)])
            ceilings[threads] = reps * len(sample) / fwd_s
        torch.set_num_threads(default_threads)
        ceiling = max(ceilings.values())

        with_s, with_cpu = _timed(
            lambda: predict_images(predictor, files, Path(tmp) / "out", batch_size=args.batch_size)
        )
        csv_s, _ = _timed(
            lambda: predict_images(predictor, files, Path(tmp) / "csv", batch_size=args.batch_size, overlays=False)
        )

        def naive() -> None:
            out = Path(tmp) / "naive"
            out.mkdir()
            for i, f in enumerate(files[: args.naive]):
                image = decode_image(f)
                r = predictor.predict(pre(image)[None])
                m = postprocess(r["mask_prob"][0], image.shape[1], image.shape[0], 0.5)
                _, cls = decide(r["defect_score"][0], r["class_probs"][0], predictor.meta)
                save_png(render_overlay(image, m.mask, float(r["defect_score"][0]), cls), str(out / f"{i}.png"))

        naive_rate = None
        if args.naive:
            naive_s, _ = _timed(naive)
            naive_rate = min(args.naive, len(files)) / naive_s
        n = len(files)
        h, w = decode_image(files[0]).shape[:2]
        result = {
            "benchmark": "predict_speed",
            "backbone": args.backbone,
            "input_px": args.size,
            "images": n,
            "image_px": f"{w}x{h}",
            "batch_size": args.batch_size,
            "torch_threads_default": default_threads,
            "ceiling_images_per_s_by_threads": {str(k): round(v, 1) for k, v in ceilings.items()},
            "cpus": os.cpu_count(),
            "ceiling_images_per_s": round(ceiling, 1),
            "predict_images_per_s": round(n / with_s, 1),
            "predict_cpu_s_per_image": round(with_cpu / n, 4),
            "predict_no_overlays_images_per_s": round(n / csv_s, 1),
            "naive_images_per_s": None if naive_rate is None else round(naive_rate, 1),
            "predict_vs_ceiling": round((n / with_s) / ceiling, 2),
            "predict_vs_naive": None if naive_rate is None else round((n / with_s) / naive_rate, 2),
        }
        print(json.dumps(result))


if __name__ == "__main__":
    main()
