"""Scoring on a simulated two-node Ray cluster (`ray.cluster_utils.Cluster`): the work spreads over both nodes.

The cluster runs in a subprocess: pytest's own process already has the session's Ray initialised. Each node has 3
CPUs and each model actor reserves 2, so the two actors must sit on different nodes; the per-row ``node_id`` (and
the run summary built from it) shows which node scored each image.
"""

from __future__ import annotations

import textwrap

import pyarrow.parquet as pq
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_work_spreads_over_two_nodes(tiny_artifact, synth_archive, tmp_path, run_script):
    out = tmp_path / "scores"
    code = textwrap.dedent(
        f"""
        import json
        import ray
        import ray.data
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 3}})
        cluster.add_node(num_cpus=3)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        from raydefect import console
        from raydefect.config import load_config
        from raydefect.pipelines.score import run_score

        console.set_verbosity(-1)
        # Both actors up before the first batch (public DataContext field): on an idle machine the first actor
        # otherwise scores the whole small archive while the second node's actor is still importing torch.
        ray.data.DataContext.get_current().wait_for_min_actors_s = 300
        cfg = load_config("default", sets=["score.model_actors=2", "score.actor_cpus=2", "score.batch_size=2",
                                           "score.rows_per_file=4", "score.model_threads=1"])
        r = run_score({str(tiny_artifact)!r}, {synth_archive["out"]!r}, {str(out)!r}, cfg)
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        print("RESULT " + json.dumps({{"scored": r.scored, "nodes": r.nodes, "cluster": nodes}}))
        ray.shutdown()
        cluster.shutdown()
        """
    )
    _, result = run_script(code)
    assert result["scored"] == synth_archive["files"] and len(result["cluster"]) == 2
    assert set(result["nodes"]) == set(result["cluster"]), result  # both nodes scored images
    assert all(n > 0 for n in result["nodes"].values())
    node_ids = pq.read_table(str(out), columns=["node_id"]).column("node_id").to_pylist()
    assert set(node_ids) == set(result["cluster"]) and len(node_ids) == synth_archive["files"]
