"""How fast `prepare` scans a dataset: prints one JSON line (images, seconds, images/s, workers).

    python benchmarks/prepare_speed.py --images 10000 --size 64

Generates synthetic 64 px images into a temporary folder (not timed), then times `prepare_dataset` on them with
its default workers (one per core) and, for the ratio docs/architecture.md's performance method asks for, with
one worker (the naive way). CPU seconds are reported too: on a shared machine they move much less than wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

from raydefect import console
from raydefect.data.importers import import_classic
from raydefect.data.prepare import default_workers, prepare_dataset
from raydefect.data.synth import DEFECT_CLASSES, generate_raw


def _cpu_s() -> float:
    """CPU seconds of this process and its finished children: a figure that other load on the machine barely moves."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=10_000, help="total images (40%% defects over 4 classes)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--workers", type=int, default=None, help="scan threads (default: prepare's default)")
    p.add_argument("--no-naive", action="store_true", help="skip the one-worker comparison run")
    p.add_argument("--copy", action="store_true", help="also copy files into the dataset (prepare --copy)")
    args = p.parse_args()
    console.set_verbosity(-1)
    per_class = int(args.images * 0.4) // len(DEFECT_CLASSES)
    normal = args.images - per_class * len(DEFECT_CLASSES)
    workers = args.workers or default_workers()
    with tempfile.TemporaryDirectory(prefix="raydefect-bench-") as tmp:
        t = time.perf_counter()
        raw = generate_raw(Path(tmp) / "raw", per_class, normal, args.size, seed=0)
        synth_s = time.perf_counter() - t
        listing = import_classic(raw["defect_images"], raw["defect_masks"], raw["normal_images"])
        t, c = time.perf_counter(), _cpu_s()
        report = prepare_dataset(listing, Path(tmp) / "ds", copy=args.copy, workers=workers)
        seconds, cpu = time.perf_counter() - t, _cpu_s() - c
        out = {
            "benchmark": "prepare_speed",
            "images": report.images,
            "size": args.size,
            "seconds": round(seconds, 3),
            "images_per_s": round(report.images / seconds, 1),
            "workers": workers,
            "cpu_seconds": round(cpu, 3),
            "images_per_cpu_s": round(report.images / cpu, 1),
            "cpus": os.cpu_count(),
            "copy": args.copy,
            "synth_seconds": round(synth_s, 3),
            "synth_images_per_s": round(raw["images"] / synth_s, 1),
        }
        if not args.no_naive:
            t, c = time.perf_counter(), _cpu_s()
            prepare_dataset(listing, Path(tmp) / "ds_naive", copy=args.copy, workers=1)
            naive = time.perf_counter() - t
            out["naive_seconds"] = round(naive, 3)
            out["naive_cpu_seconds"] = round(_cpu_s() - c, 3)
            out["speedup_vs_naive"] = round(naive / seconds, 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
