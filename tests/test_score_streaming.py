"""`raydefect score` commits output files while images remain to be scored (a run killed late keeps its work).

Regression: on a 2-CPU Ray, Ray Data reserved the one CPU the model actors left to the stages upstream (listing,
decoding), so the mask-finishing and writing tasks got none until every image was decoded and scored: every file was
committed in the run's last seconds. Reproduced only with 2 CPUs in all, so the run has its own embedded Ray in a
subprocess (the tests' shared Ray has 4).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

N_IMAGES = 1500  # the old pipeline committed its first file after all 1,500 (3 runs of 3); the fixed one at 34-43 %

RUN = """
import json, sys
from raydefect.config import load_config
from raydefect.pipelines.cluster import connect
from raydefect.pipelines.score import run_score

model, archive, out = sys.argv[1:4]
connect(None, num_cpus=2)
sets = ["score.rows_per_file=64", "score.commit_interval_s=0", "score.batch_size=16"]
report = run_score(model, archive, out, load_config("default", sets=sets))
print("TIMELINE " + json.dumps(report.timeline))
"""


def test_files_are_committed_while_images_remain_to_be_scored(tiny_artifact, tmp_path):
    from raydefect.data.synth import generate_archive

    archive = generate_archive(tmp_path / "archive", N_IMAGES, 64, seed=5, n_corrupt=0, workers=2)["out"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("RAY_ADDRESS", None)
    argv = [sys.executable, "-c", RUN, str(tiny_artifact), str(archive), str(tmp_path / "scores")]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, check=False)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("TIMELINE ")), None)
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    # Ray's notice at every embedded start (a secure default, nothing to do) is shown with -v only
    assert "Token authentication is enabled" not in proc.stderr, proc.stderr[-3000:]
    timeline = json.loads(line[len("TIMELINE ") :])  # (seconds, rows committed, images scored by then) per commit
    assert timeline[-1][1] == N_IMAGES
    _, committed, scored = timeline[0]
    assert 0 < committed < N_IMAGES
    assert 0 < scored <= 0.8 * N_IMAGES, f"first file committed when {scored} of {N_IMAGES} were scored: {timeline}"
