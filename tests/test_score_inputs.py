"""Inputs of `raydefect score`: folders, globs, manifests (txt, csv, parquet) and object storage (S3, GCS).

The listing stage is the only part that differs between input kinds, so most kinds are checked through the
pipeline's dry run (`list_pending`: Ray Data listing + incremental filter, no model); full scoring runs cover a
text manifest (relative paths, a missing file, a repeated entry), --rescore, and object storage in and out (moto's
S3 server and a GCS emulator: model, archive and scores on the bucket).
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydefect.config import load_config
from raydefect.errors import DataError
from raydefect.scoring.results import read_scores, summarize

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SETS = ["score.rows_per_file=16", "score.commit_interval_s=0", "score.batch_size=8"]


@pytest.fixture(scope="module")
def inputs(synth_archive, tmp_path_factory):
    base = tmp_path_factory.mktemp("inputs")
    archive = Path(synth_archive["out"])
    files = sorted(str(p) for p in archive.rglob("*") if p.is_file())
    return SimpleNamespace(base=base, archive=archive, files=files, cfg=load_config("default", sets=SETS))


def _pending(inputs, tiny_artifact, text, out=None) -> list[str]:
    from raydefect.pipelines.score import list_pending

    table = list_pending(str(tiny_artifact), text, str(out or inputs.base / "none"), inputs.cfg)
    return sorted(table.column("path").to_pylist())


def test_folder_and_glob_listings(ray_session, inputs, tiny_artifact):
    assert _pending(inputs, tiny_artifact, str(inputs.archive)) == inputs.files
    pngs = sorted(f for f in inputs.files if f.startswith(str(inputs.archive / "line_1")) and f.endswith(".png"))
    assert pngs and _pending(inputs, tiny_artifact, str(inputs.archive / "line_1" / "**" / "*.png")) == pngs
    day = sorted(f for f in inputs.files if "/day_01/" in f or "/day_02/" in f)
    assert _pending(inputs, tiny_artifact, str(inputs.archive / "line_*" / "day_0[12]" / "*")) == day


def test_csv_and_parquet_manifests(ray_session, inputs, tiny_artifact):
    some = inputs.files[:7]
    csv_path = inputs.base / "list.csv"
    csv_path.write_text("id,image\n" + "".join(f"{i},{p}\n" for i, p in enumerate(some)))
    assert _pending(inputs, tiny_artifact, str(csv_path)) == sorted(some)
    pq_path = inputs.base / "list.parquet"  # relative paths, as in a `prepare --copy` manifest
    rel = [os.path.relpath(p, inputs.base) for p in inputs.files[10:15]]
    pq.write_table(pa.table({"path": rel, "label": [0] * 5}), pq_path)
    assert _pending(inputs, tiny_artifact, str(pq_path)) == sorted(inputs.files[10:15])
    bad = inputs.base / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="name the column of image paths 'path'"):
        _pending(inputs, tiny_artifact, str(bad))
    from raydefect.pipelines.score import run_score

    out = inputs.base / "scores-bad"  # a run refused while planning leaves no record claiming to be running
    with pytest.raises(DataError, match="name the column of image paths 'path'"):
        run_score(str(tiny_artifact), str(bad), str(out), inputs.cfg)
    assert not list((out / "_commits").glob("*.json"))


def test_text_manifest_scoring_and_rescore(ray_session, inputs, tiny_artifact):
    from raydefect.pipelines.score import run_score

    chosen = inputs.files[:4]
    manifest = inputs.base / "nightly.txt"
    lines = ["# tonight's images", "", *[os.path.relpath(p, inputs.base) for p in chosen], chosen[0], "gone.png"]
    manifest.write_text("\n".join(lines) + "\n")
    out = inputs.base / "scores-txt"
    r = run_score(str(tiny_artifact), str(manifest), str(out), inputs.cfg)
    assert r.listed == 6 and r.scored == 5  # the repeated entry is scored once
    assert r.repeated == 1 and r.skipped == 0 and "(1 listed twice, scored once)" in r.summary_lines()[1]
    table = pq.read_table(str(out))
    assert sorted(table.column("path").to_pylist()) == sorted([*chosen, str(inputs.base / "gone.png")])
    gone = next(row for row in table.to_pylist() if row["path"].endswith("gone.png"))
    assert gone["error"] == "file not found" and gone["size"] is None
    assert _pending(inputs, tiny_artifact, str(manifest), out) == []  # dry run: nothing left to do
    r2 = run_score(str(tiny_artifact), str(manifest), str(out), inputs.cfg, rescore=True)
    assert r2.scored == 5
    assert pq.read_table(str(out)).num_rows == 10 and read_scores(str(out)).num_rows == 5
    assert set(read_scores(str(out)).column("run_id").to_pylist()) == {r2.run_id}  # the newest rows win


def _line_2(synth_archive) -> list[tuple[str, bytes]]:
    """The archive's line_2 images as (key under ``archive/``, bytes)."""
    root = Path(synth_archive["out"])
    files = sorted(p for p in root.rglob("*") if p.is_file() and "line_2" in p.parts)
    return [(f"archive/{p.relative_to(root).as_posix()}", p.read_bytes()) for p in files]


@pytest.fixture(scope="module")
def s3(s3_server, synth_archive):
    """The moto server with the archive's line_2 uploaded under ``s3://factory/archive/``."""
    files = _line_2(synth_archive)
    for key, data in files:
        s3_server.put_object(Bucket="factory", Key=key, Body=data)
    return SimpleNamespace(client=s3_server, keys=[k for k, _ in files])


def _bucket_round_trip(scheme, put, keys, tiny_artifact, inputs) -> None:
    """Model, archive and scores all on one object store: scored once, then nothing new on a re-run; a glob and a
    manifest on the bucket list the same images."""
    from raydefect.pipelines.score import run_score

    # the model on object storage too: the driver fetches it, the actors get its bytes
    for name in ("model.yaml", "model.safetensors"):
        put(f"models/m1/{name}", (tiny_artifact / name).read_bytes())
    model, out = f"{scheme}://factory/models/m1", f"{scheme}://factory/scores"
    r = run_score(model, f"{scheme}://factory/archive/", out, inputs.cfg)
    expected = sorted(f"{scheme}://factory/{k}" for k in keys)
    assert r.scored == len(expected) and r.listed == len(expected)
    current = read_scores(out)
    assert sorted(current.column("path").to_pylist()) == expected
    assert summarize(out)["images"] == len(expected)
    r2 = run_score(model, f"{scheme}://factory/archive/", out, inputs.cfg)
    assert (r2.scored, r2.skipped) == (0, len(expected))
    # a glob and a text manifest on the bucket list the same images (dry run: no model)
    put("lists/today.txt", "\n".join(f"../{k}" for k in keys).encode())
    none = f"{scheme}://factory/nothing"
    pngs = [p for p in expected if p.endswith(".png")]
    assert pngs and len(pngs) < len(expected)
    assert _pending(inputs, tiny_artifact, f"{scheme}://factory/archive/**/*.png", none) == pngs
    assert _pending(inputs, tiny_artifact, f"{scheme}://factory/lists/today.txt", none) == expected


def test_s3_input_and_output(ray_session, s3, tiny_artifact, inputs):
    _bucket_round_trip(
        "s3",
        lambda key, data: s3.client.put_object(Bucket="factory", Key=key, Body=data),
        s3.keys,
        tiny_artifact,
        inputs,
    )
    listed = s3.client.list_objects_v2(Bucket="factory", Prefix="scores/")["Contents"]
    data = [o["Key"] for o in listed if o["Key"].endswith(".parquet")]
    assert data and all(k.count("/") == 3 for k in data)  # scores/<model>/<run>/part-*.parquet
    assert not [o["Key"] for o in listed if "_staging" in o["Key"] and not o["Key"].endswith("/")]


def test_gcs_input_and_output(ray_session, gcs_server, synth_archive, tiny_artifact, inputs):
    """gs:// through pyarrow's GcsFileSystem against a local emulator (STORAGE_EMULATOR_HOST): listing, reading,
    staged writes and their commit (GCS has no rename: pyarrow copies and deletes), incremental re-run."""
    import pyarrow.fs as pafs

    host = gcs_server.split("://", 1)[1]
    gcs = pafs.GcsFileSystem(anonymous=True, scheme="http", endpoint_override=host)

    def put(key: str, data: bytes) -> None:
        with gcs.open_output_stream(f"factory/{key}") as f:
            f.write(data)

    files = _line_2(synth_archive)
    for key, data in files:
        put(key, data)
    keys = [k for k, _ in files]
    _bucket_round_trip("gs", put, keys, tiny_artifact, inputs)
    written = [i.path for i in gcs.get_file_info(pafs.FileSelector("factory/scores", recursive=True)) if i.is_file]
    data = [p for p in written if p.endswith(".parquet")]
    assert data and all(p.count("/") == 4 for p in data)  # factory/scores/<model>/<run>/part-*.parquet
    assert not [p for p in written if "_staging" in p]


def test_model_actors_that_would_take_every_cpu_are_refused(ray_session, inputs, tiny_artifact, tmp_path):
    """Actors holding every CPU would leave none to decode: Ray Data would wait forever. Refused before any work."""
    from raydefect.config import load_config
    from raydefect.errors import ConfigError
    from raydefect.pipelines.score import run_score

    cfg = load_config("default", sets=["score.model_actors=4", "score.actor_cpus=1"])  # the session's Ray has 4 CPUs
    with pytest.raises(ConfigError, match=r"score.model_actors=4 x score.actor_cpus=1 reserve 4 of the cluster's 4"):
        run_score(str(tiny_artifact), str(inputs.archive), str(tmp_path / "scores"), cfg)
    assert not list((tmp_path / "scores").glob("*.parquet"))


def test_default_model_actors_share_each_gpu_but_leave_cpus_to_decode():
    from raydefect.scoring.sizing import default_actors

    assert default_actors(0, 2, 0.0, 0) == 2  # CPU: one single-threaded replica per core
    assert default_actors(0, 64, 0.0, 0, nodes=2) == 16  # at most 8 per node: more threads each instead
    assert default_actors(0, 1, 0.0, 0) == 1
    assert default_actors(0, 4, 0.0, 0, cores=2) == 2  # one node: at most its cores (tests: 4 CPUs on 2 cores)
    assert default_actors(0, 64, 0.0, 0, nodes=2, cores=2) == 16  # several nodes: the driver's cores say nothing
    assert default_actors(1, 16, 1.0, 4) == 4  # one H200, 16 CPUs: the measured best
    assert default_actors(1, 4, 1.0, 4) == 2  # no more than half the CPUs
    assert default_actors(8, 32, 1.0, 4) == 16  # 2 per GPU: the same on every GPU
    assert default_actors(8, 8, 1.0, 4) == 8  # never fewer than one per GPU
    assert default_actors(2, 64, 2.0, 4) == 8


def test_cpu_replicas_reserve_half_the_cpus_and_leave_one():
    """Without GPUs: one single-threaded replica per CPU; together they reserve half of the CPUs and always leave
    one to the other stages' whole-CPU tasks (a one-CPU machine: the replica reserves none)."""
    from raydefect.config import load_config
    from raydefect.scoring.sizing import check_cpus_left as _check_cpus_left
    from raydefect.scoring.sizing import resolve_actors

    sc = load_config("default").score
    assert resolve_actors(sc, 0, 2) == (2, 0.5)  # the dev machine: two replicas, one CPU left for tasks
    assert resolve_actors(sc, 0, 1) == (1, 0.0)
    assert resolve_actors(sc, 0, 4, cores=2) == (2, 1.0)  # the tests' Ray: 4 logical CPUs on 2 cores
    assert resolve_actors(sc, 0, 32, nodes=2) == (16, 1.0)
    assert resolve_actors(sc, 1, 16) == (4, 1.0)  # GPUs: as before, one CPU per replica
    explicit = load_config("default", sets=["score.model_actors=3", "score.actor_cpus=0.25"]).score
    assert resolve_actors(explicit, 0, 8) == (3, 0.25)
    for cpus in (1, 2, 3, 4, 64):
        actors, actor_cpus = resolve_actors(sc, 0, cpus)
        _check_cpus_left(actors, actor_cpus, cpus)  # the defaults never leave the tasks without a CPU
        assert actors * actor_cpus <= cpus / 2


def test_output_files_hold_whole_model_batches():
    """A file is a whole number of model batches (a write task gets whole blocks of batch_size rows: 2,000 rows per
    file in 64-row blocks wrote files of 2,000 and 48 rows), never more than score.rows_per_file."""
    from raydefect.scoring.sizing import file_rows

    assert file_rows(2000, 64) == 1984
    assert file_rows(5000, 32) == 4992  # the defaults
    assert file_rows(16, 8) == 16
    assert file_rows(10, 32) == 10  # smaller than a batch: blocks are split
    for rows, batch in ((1, 1), (7, 3), (100, 7), (4096, 100)):
        n = file_rows(rows, batch)
        assert 0 < n <= rows and (n % batch == 0 or rows < batch)
