"""`raydefect --address ... tune` on a simulated two-node Ray cluster (`ray.cluster_utils.Cluster`).

The cluster runs in a subprocess (pytest's process already has the session's Ray) and the CLI joins it by address,
as a user's driver on a cluster node does. Each node has 2 CPUs and each trial's Ray Train worker reserves 2, so the
study runs 2 trials at a time only by putting one on each node.
"""

from __future__ import annotations

import csv
import json
import textwrap

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_tune_runs_trials_on_both_nodes_of_a_cluster(synth_dataset, tmp_path, run_script):
    runs = tmp_path / "runs"
    code = textwrap.dedent(
        f"""
        import json
        import ray
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 2}})
        cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        from raydefect.cli import cli

        code = 0
        try:
            cli.main(["--address", cluster.address, "tune", "--config", "demo", "--data", {str(synth_dataset.root)!r},
                      "--num-samples", "2", "--set", "train.runs_dir={runs}", "--set", "tune.epochs=1"],
                     standalone_mode=False)
            nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        except Exception as e:
            code, nodes = repr(e), []
        print("RESULT " + json.dumps({{"code": code, "nodes": nodes}}))
        ray.shutdown()
        cluster.shutdown()
        """
    )
    proc, result = run_script(code)
    assert result["code"] == 0 and len(result["nodes"]) == 2, (result, proc.stdout[-3000:])
    assert "2 of 2 trials finished, 0 failed" in proc.stdout and "(2 at a time)" in proc.stdout, proc.stdout[-3000:]
    assert "Configuration for experiment" not in proc.stdout  # our summary, not Ray Tune's boxes
    study = runs / "tune-demo"
    rows = list(csv.DictReader((study / "trials.csv").open()))
    assert [r["status"] for r in rows] == ["TERMINATED", "TERMINATED"]
    assert (study / "best.yaml").is_file()
    # the two trials overlapped in time: with 2 CPUs per node and 2 per trial, they ran on different nodes
    # (a trial's end: its own record, or -- when Tune stopped it at its last epoch before the function wrote that --
    # the last epoch's row, as `collect_trials` reads it)
    spans = []
    for row in rows:
        folder = study / "trials" / row["trial_id"]
        record = json.loads((folder / "trial.json").read_text())
        epochs = list(csv.DictReader((folder / "metrics.csv").open()))
        spans.append((record["started_at"], record.get("finished_at") or float(epochs[-1]["finished_at"])))
    first, second = sorted(spans)
    assert second[0] < first[1], spans
