"""Peak memory and time of `raydefect scores report` over a big scores folder: prints one JSON line.

    python benchmarks/scores_report_memory.py --rows 10000000 --nights 10

Writes a synthetic scores folder with pyarrow (`raydefect.scoring.synthetic`: the store's real layout and commit
records, 1 M rows per Parquet file, a shifted last night; not timed), then runs the report in a child process and
reads the child's peak RSS (its VmHWM; Linux). For the ratio the performance method asks for, the
same report runs first on a 10,000-row folder: the interpreter with pyarrow and numpy loaded, what any report costs.
Bounded memory means the big folder's peak stays close to that floor, however many rows.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from raydefect.metrics.drift import build_reference
from raydefect.scoring.synthetic import Night, write_scores_folder

# The child reports its own high-water mark (VmHWM of /proc/self/status: this process image only). getrusage's
# RUSAGE_CHILDREN would count the parent's pages at fork time, i.e. the memory that generating the folder took.
REPORT = (
    "import re, sys, time; from raydefect.scoring.trends import build_report, write_report; t = time.perf_counter(); "
    "r = build_report(sys.argv[1]); write_report(r, sys.argv[2]); "
    "hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1); "
    "print(time.perf_counter() - t, r['images'], r['night']['alarm'], hwm)"
)


def _write(folder: Path, rows: int, nights: int) -> float:
    import numpy as np

    rng = np.random.default_rng(0)
    reference = build_reference(
        rng.beta(0.5, 4.0, 2000), 0.5, np.clip(rng.normal(0.45, 0.04, 2000), 0, 1), rng.normal(0.12, 0.02, 2000)
    ).to_dict()
    per = rows // nights
    plan = [Night(f"202601{d + 1:02d}T020000Z-{d:06x}", per, seed=d) for d in range(nights - 1)]
    plan.append(Night(f"202601{nights:02d}T020000Z-ffffff", rows - per * (nights - 1), brightness=0.6, seed=99))
    start = time.perf_counter()
    write_scores_folder(str(folder), plan, reference=reference)
    return time.perf_counter() - start


def _report(folder: Path, dest: Path) -> tuple[float, float, str]:
    """(seconds, peak RSS MiB of the child, its output line)."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", REPORT, str(folder), str(dest)], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if out.returncode:
        raise SystemExit(out.stderr)
    line = out.stdout.strip().splitlines()[-1]
    return seconds, int(line.split()[-1]) / 1024, line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--nights", type=int, default=10)
    parser.add_argument("--dir", default=None, help="Where to write the folders (default: a temporary folder).")
    args = parser.parse_args()
    base = Path(args.dir or tempfile.mkdtemp(prefix="raydefect-report-bench-"))
    try:
        _write(base / "small", 10_000, 2)
        small_s, small_mib, _ = _report(base / "small", base / "small-report")
        write_s = _write(base / "big", args.rows, args.nights)
        size = sum(f.stat().st_size for f in (base / "big").rglob("*.parquet"))
        big_s, big_mib, line = _report(base / "big", base / "big-report")
        print(
            json.dumps(
                {
                    "rows": args.rows,
                    "nights": args.nights,
                    "parquet_mib": round(size / 2**20, 1),
                    "write_s": round(write_s, 1),
                    "report_s": round(big_s, 1),
                    "rows_per_s": round(args.rows / big_s),
                    "peak_rss_mib": round(big_mib, 1),
                    "peak_rss_mib_10k_rows": round(small_mib, 1),
                    "small_report_s": round(small_s, 1),
                    "rows_per_file": 1_000_000,
                    "alarm": line.split()[-2] == "True",
                    "cpus": os.cpu_count(),
                }
            )
        )
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
