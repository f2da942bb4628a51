"""Nightly scoring entry point for `ray job submit` (and cron): score new or changed images into Parquet.

    ray job submit --address http://head:8265 --working-dir jobs -- \
        python nightly_score.py --model /models/line3 --input s3://factory/archive/manifest.parquet \
        --out s3://factory/scores

Inside a Ray job, RAY_ADDRESS points at the cluster, so the library connects to it. The run is incremental and
safe to repeat or to restart after a crash (see `raydefect.scoring.store`): schedule it as often as you like. It
only calls the library; the library never imports this file.

Exit codes: 0 done, 1 a user error (bad path, lock held by another run, ...; one line on stderr), 2 bad arguments,
130 / 143 stopped by SIGINT / SIGTERM (what was scored is committed; the next run scores the rest).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="model artifact folder (runs/<name>/model) or its URI")
    p.add_argument("--input", required=True, help="folder, glob or manifest (.txt/.csv/.parquet), local or s3://")
    p.add_argument("--out", required=True, help="scores folder, local or s3://")
    p.add_argument("--config", default="default", help="shipped config name or YAML file")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--rescore", action="store_true", help="score every image again")
    p.add_argument("--retry-errors", action="store_true", help="score images whose last row has an error again")
    p.add_argument("--summary-json", help="write the run summary here as JSON (e.g. for monitoring)")
    p.add_argument("-q", "--quiet", action="store_true", help="only the final summary")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    from raydefect import console
    from raydefect.config import load_config
    from raydefect.errors import RaydefectError, Terminated
    from raydefect.paths import check_report_file, write_text_atomic
    from raydefect.pipelines.score import run_score

    console.set_verbosity(-1 if args.quiet else 0)
    try:
        if args.summary_json:
            check_report_file(args.summary_json, "--summary-json", args.out)
        cfg = load_config(args.config, sets=args.sets)
        report = run_score(
            args.model,
            args.input,
            args.out,
            cfg,
            rescore=args.rescore,
            retry_errors=args.retry_errors,
            address=os.environ.get("RAY_ADDRESS"),
        )
    except RaydefectError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (`ray job stop`, a pod deleted): the run committed its work
        terminated = isinstance(e, Terminated)
        print("terminated" if terminated else "interrupted", file=sys.stderr)
        return 143 if terminated else 130
    for line in report.summary_lines():
        console.result(line)
    if args.summary_json:
        try:
            write_text_atomic(args.summary_json, json.dumps(report.to_dict(), indent=1, default=str))
        except RaydefectError as e:
            print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
