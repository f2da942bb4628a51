"""How fast `raydefect score` runs against its ceiling and the naive way, and whether its memory stays flat.

    python benchmarks/score_throughput.py                       # throughput: (a) (b) (c), one JSON line
    python benchmarks/score_throughput.py --memory              # peak memory: 2,000 vs 20,000 images

Throughput, on the same random-init model artifact and the same synthetic images (JPEG/PNG mix):

- (a) ceiling: the bare model forward (`Predictor.predict`) on pre-decoded, pre-normalised tensors, batched;
- (b) pipeline: `run_score` end to end on an embedded local Ray (list, read, decode, model actor, masks, PNG,
  Parquet, commit). Reported twice: over the whole run (``b_e2e``, includes Ray Data start-up and the model actor
  loading torch) and in steady state (``b_steady``: images committed between the first and the last commit, over
  that time), which is what a nightly run over millions of images sees;
- (c) naive: one image at a time -- open, decode, preprocess, forward a batch of one, threshold, save a PNG mask.

All three use every core for torch (a and c in this process; b in its model actor, while decoding and mask
encoding run in other Ray workers on the same cores). The model must be compute-bound for the ratio to mean
anything: a ViT-S/16 (`dinov3-s` architecture, random weights) at 224 px by default.

Memory (``--memory``): `run_score` with a small model (``test-tiny`` at 32 px on 64 px images, so that 20,000 images
take minutes, not hours) over 2,000 and over 20,000 images, each in a fresh process with its own embedded Ray. Peak
memory is the largest sum of PSS (proportional set size: shared pages such as Ray's object store are split between
the processes that map them, so nothing is counted twice) over the driver and all its descendants (GCS, raylet,
workers, model actor), sampled every 0.5 s with psutil.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from raydefect import console


def _model(out: Path, backbone: str, image_size: int) -> str:
    import torch

    from raydefect.config import ModelConfig
    from raydefect.models.artifact import save_artifact
    from raydefect.models.model import DefectModel

    torch.manual_seed(0)
    cfg = ModelConfig(backbone=backbone, pretrained=False)
    net = DefectModel(cfg, image_size, ("normal", "scratch", "spot", "crack")).eval()
    save_artifact(net, out, thresholds={"image": 0.5, "pixel": 0.5}, extra={"note": "benchmark, random weights"})
    return str(out)


def _files(root: str) -> list[str]:
    return sorted(str(p) for p in Path(root).rglob("*") if p.is_file())


def ceiling(model: str, files: list[str], batch_size: int) -> float:
    """(a) images/s of the bare forward on pre-decoded tensors."""
    import torch

    from raydefect.inference import Predictor, Preprocessor
    from raydefect.models.artifact import load_artifact

    torch.set_num_threads(os.cpu_count() or 1)
    loaded = load_artifact(model)
    pre, predictor = Preprocessor(loaded.meta), Predictor(loaded, device="cpu")
    x = np.stack([pre.from_bytes(Path(f).read_bytes(), path=f)[0] for f in files])
    predictor.predict(x[:batch_size])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(x), batch_size):
        predictor.predict(x[i : i + batch_size])
    return len(x) / (time.perf_counter() - start)


def naive(model: str, files: list[str], out: Path) -> float:
    """(c) images/s one image at a time, saving each mask as a PNG."""
    import torch

    from raydefect.imaging import decode_image, encode_png
    from raydefect.inference import Predictor, Preprocessor, postprocess
    from raydefect.models.artifact import load_artifact

    torch.set_num_threads(os.cpu_count() or 1)
    loaded = load_artifact(model)
    pre, predictor = Preprocessor(loaded.meta), Predictor(loaded, device="cpu")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for i, f in enumerate(files):
        image = decode_image(f)
        result = predictor.predict(pre(image)[None])
        mask = postprocess(result["mask_prob"][0], image.shape[1], image.shape[0], loaded.meta.pixel_threshold)
        (out / f"{i:06d}.png").write_bytes(encode_png(mask.mask))
    return len(files) / (time.perf_counter() - start)


def pipeline(model: str, archive: str, out: str, batch_size: int, rows_per_file: int) -> dict:
    """(b) `run_score` end to end on an embedded local Ray."""
    from raydefect.config import load_config
    from raydefect.pipelines.cluster import connect
    from raydefect.pipelines.score import run_score

    connect(None, num_cpus=os.cpu_count())
    cfg = load_config(
        "default",
        sets=[f"score.batch_size={batch_size}", f"score.rows_per_file={rows_per_file}", "score.commit_interval_s=0"],
    )
    start = time.perf_counter()
    report = run_score(model, archive, out, cfg)
    wall = time.perf_counter() - start
    t = report.timeline
    steady = (t[-1][1] - t[0][1]) / (t[-1][0] - t[0][0]) if len(t) >= 3 and t[-1][0] > t[0][0] else 0.0
    return {"scored": report.scored, "e2e": report.scored / wall, "steady": steady, "wall_s": wall}


class PeakPss:
    """Samples the summed PSS of this process and all its descendants in a thread; ``peak`` in bytes."""

    def __init__(self, interval: float = 0.5) -> None:
        import psutil

        self.me = psutil.Process()
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        import psutil

        total = 0
        for p in [self.me, *self.me.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                total += p.memory_full_info().pss  # a process that ended between listing and reading
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._sample())
            self.samples += 1

    def __enter__(self) -> PeakPss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def memory_run(images: int, workdir: str) -> dict:
    """One memory measurement in this (fresh) process: score `images` images of `workdir`'s archive."""
    from raydefect.data.synth import generate_archive

    archive = Path(workdir) / f"archive-{images}"
    if not archive.exists():
        generate_archive(archive, images, 64, seed=0, n_corrupt=0, workers=os.cpu_count())
    model = Path(workdir) / "tiny-model"
    if not model.exists():
        _model(model, "test-tiny", 32)
    with PeakPss() as peak:
        r = pipeline(str(model), str(archive), str(Path(workdir) / f"scores-{images}-{time.time_ns()}"), 64, 5000)
    return {"images": images, "peak_pss_mb": round(peak.peak / 2**20, 1), "samples": peak.samples, **r}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=384, help="images for (a) and (b)")
    p.add_argument("--naive-images", type=int, default=96, help="images for (c), a subset (it is slow)")
    p.add_argument("--size", type=int, default=256, help="side of the synthetic images in pixels")
    p.add_argument("--backbone", default="dinov3-s", help="backbone architecture (random weights)")
    p.add_argument("--image-size", type=int, default=224, help="model input side")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--memory", action="store_true", help="measure peak memory at 2,000 and 20,000 images instead")
    p.add_argument("--memory-run", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    console.set_verbosity(-1)

    if args.memory_run:
        print("RESULT " + json.dumps(memory_run(args.memory_run, args.workdir)), flush=True)
        return
    with tempfile.TemporaryDirectory(prefix="raydefect-bench-") as tmp:
        if args.memory:
            results = []
            for n in (2_000, 20_000):
                proc = subprocess.run(
                    [sys.executable, __file__, "--memory-run", str(n), "--workdir", tmp],
                    capture_output=True,
                    text=True,
                    check=False,
                )
                line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if line is None:
                    raise SystemExit(f"memory run {n} failed:\n{proc.stderr[-3000:]}")
                results.append(json.loads(line[7:]))
            small, big = results
            print(
                json.dumps(
                    {
                        "benchmark": "score_memory",
                        "model": "test-tiny 32 px, 64 px images",
                        "runs": results,
                        "peak_ratio_20k_over_2k": round(big["peak_pss_mb"] / small["peak_pss_mb"], 3),
                        "cpus": os.cpu_count(),
                    }
                )
            )
            return
        from raydefect.data.synth import generate_archive

        archive = Path(tmp) / "archive"
        generate_archive(archive, args.images, args.size, seed=0, n_corrupt=0, workers=os.cpu_count())
        files = _files(str(archive))
        model = _model(Path(tmp) / "model", args.backbone, args.image_size)
        a = ceiling(model, files, args.batch_size)
        c = naive(model, files[: args.naive_images], Path(tmp) / "naive")
        b = pipeline(model, str(archive), str(Path(tmp) / "scores"), args.batch_size, 4 * args.batch_size)
        print(
            json.dumps(
                {
                    "benchmark": "score_throughput",
                    "backbone": args.backbone,
                    "image_size": args.image_size,
                    "images": len(files),
                    "image_px": args.size,
                    "batch_size": args.batch_size,
                    "cpus": os.cpu_count(),
                    "a_ceiling_ips": round(a, 2),
                    "b_e2e_ips": round(b["e2e"], 2),
                    "b_steady_ips": round(b["steady"], 2),
                    "c_naive_ips": round(c, 2),
                    "b_steady_over_a": round(b["steady"] / a, 3),
                    "b_e2e_over_a": round(b["e2e"] / a, 3),
                    "b_steady_over_c": round(b["steady"] / c, 3),
                    "b_e2e_over_c": round(b["e2e"] / c, 3),
                    "b_wall_s": round(b["wall_s"], 1),
                    "load_avg_1m": round(os.getloadavg()[0], 2),
                }
            )
        )


if __name__ == "__main__":
    main()
