"""Exactly once under SIGKILL: a scoring run killed at random points and started again ends with one row per image.

Each attempt is `raydefect score` in a subprocess (its own driver, connected to the session's Ray), killed with
SIGKILL together with its process group (the second with SIGINT, Ctrl-C, the third with SIGTERM, to the driver);
the next attempt recovers what the dead one left (staged files, moved but unrecorded files, a record still saying
"running"). The final attempt runs to the end. The check reads the Parquet files directly -- pyarrow and DuckDB,
no raydefect de-duplication -- so a duplicate or a lost image fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

N_IMAGES = 240  # enough that the third attempt is still scoring when it gets its SIGTERM


def _committed_rows(out: Path, skip: frozenset[str] = frozenset()) -> int:
    """Rows the run records list, leaving out the records named in `skip`."""
    total = 0
    for rec in (out / "_commits").glob("*.json"):
        with contextlib.suppress(OSError, ValueError, KeyError):  # a record being replaced
            total += 0 if rec.name in skip else json.loads(rec.read_text())["rows"]
    return total


def test_killed_runs_restarted_end_with_exactly_one_row_per_image(ray_session, tiny_artifact, tmp_path):
    from raydefect.data.synth import generate_archive

    archive = generate_archive(tmp_path / "archive", N_IMAGES, 48, seed=5, n_corrupt=2)["out"]
    files = sorted(str(p) for p in Path(archive).rglob("*") if p.is_file())
    out = tmp_path / "scores"
    address = ray_session.get_runtime_context().gcs_address
    argv = [
        sys.executable, "-m", "raydefect.cli", "--address", address, "score",
        "--model", str(tiny_artifact), "--input", archive, "--out", str(out),
        "--set", "score.rows_per_file=3", "--set", "score.commit_interval_s=0", "--set", "score.batch_size=4",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    rng = random.Random(1234)
    states = []
    gentle = {1: (signal.SIGINT, 130, "interrupted"), 2: (signal.SIGTERM, 143, "terminated")}  # Ctrl-C, `kill`
    for attempt in range(4):
        proc = subprocess.Popen(
            argv, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        # this run's own commits: recovering a dead run's files adds rows to that run's record before this one scores
        earlier = frozenset(p.name for p in (out / "_commits").glob("*.json")) if out.exists() else frozenset()
        deadline = time.monotonic() + 240
        if attempt == 0:  # kill right after the first commit: staged files and an open record are left
            while _committed_rows(out) == 0 and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
        else:  # after this run's first commit or a little later: while scoring or committing
            while _committed_rows(out, earlier) == 0 and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.3))
        interrupted = attempt in gentle and proc.poll() is None
        if interrupted:  # the driver commits what it holds, marks its run interrupted and says so
            os.kill(proc.pid, gentle[attempt][0])
        elif proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
        if interrupted and proc.returncode != 0:  # 0 if it had just finished
            if proc.returncode != gentle[attempt][1]:
                print(err)  # the whole of it: an assertion message is cut to a few lines
            assert proc.returncode == gentle[attempt][1], (proc.returncode, err[-3000:])
            assert "interrupted:" in err and "the same command scores the rest" in err, err[-2000:]
            assert err.rstrip().endswith(gentle[attempt][2]), err[-2000:]
            assert "Traceback" not in err and "SIGTERM received" not in err, err[-3000:]
        states.append(_committed_rows(out))
        at = time.monotonic() - deadline + 240
        print(f"attempt {attempt}: rc {proc.returncode} at {at:.1f} s, {states[-1]} rows committed")
    final = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-3000:]
    # the first kill really was mid-way: a tiny model scores 80 images in about a second on an idle machine, so the
    # kill follows the first commit at once (polled every 10 ms; files of 3 rows)
    assert 0 < states[0] < N_IMAGES, states

    table = pq.read_table(str(out), columns=["path", "error", "run_id"])
    paths = table.column("path").to_pylist()
    assert len(paths) == len(set(paths)) == N_IMAGES, f"duplicates or losses after kills at {states}"
    assert sorted(paths) == files
    assert sum(e is not None for e in table.column("error").to_pylist()) == 2
    import duckdb

    n, distinct = (
        duckdb.connect()
        .execute(f"SELECT count(*), count(DISTINCT path) FROM read_parquet('{out}/*/*/*.parquet')")
        .fetchone()
    )
    assert n == distinct == N_IMAGES
    assert not [p for p in (out / "_staging").rglob("*") if p.is_file()]
    records = [json.loads(p.read_text()) for p in (out / "_commits").glob("*.json")]
    assert sum(r["rows"] for r in records) == N_IMAGES  # the records list every committed row once
    assert records and all(r["state"] in ("finished", "interrupted") for r in records)
    assert any(r["state"] == "interrupted" for r in records)
