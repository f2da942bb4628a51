"""`raydefect score`: nightly bulk scoring with Ray Data -> masks and scores in Parquet (contract 3).

The stages (each a function or class from `raydefect.scoring`, which knows nothing of Ray)::

    listing parts (driver lists the top levels only)  or  the manifest (Ray Data reader, streamed)
      -> list / stat in parallel tasks -> drop what this model already scored (stat key)
      -> streaming repartition (decode parallelism does not depend on the folder layout)
      -> read bytes, sha1, decode, resize           CPU tasks
      -> model                                      actor pool: score.actors_per_gpu per GPU (bf16), else one
                                                    single-threaded CPU actor per core
      -> masks at each image's size, PNG, bbox      CPU tasks
      -> staged Parquet files, <= rows_per_file     CPU tasks; each hands back name, counts, key digests
    driver: commits the staged files every score.commit_interval_s (see `raydefect.scoring.store`)

Memory stays bounded whatever the input size: Ray Data streams with backpressure, listing yields bounded batches,
and the driver holds only the key digests (16 bytes per image) and the files not yet committed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from raydefect import console
from raydefect.config import Config, ScoreConfig
from raydefect.data.pool import cpu_workers
from raydefect.errors import DataError
from raydefect.inference import resolve_scoring
from raydefect.paths import is_remote, split_scheme
from raydefect.pipelines.cluster import quiet_ray_data
from raydefect.pipelines.failures import user_error
from raydefect.pipelines.score_stages import (
    ModelActor,
    actor_kwargs,
    decode_stage,
    fetch_model,
    filter_known,
    finish_stage,
    light_stage,
    listing_dataset,
    make_counter,
    write_stage,
)
from raydefect.pipelines.signals import CommitGuard, sigterm_as_interrupt
from raydefect.scoring.keys import KeySet
from raydefect.scoring.records import RunRecord, StagedFile, new_run_id
from raydefect.scoring.report import ScoreReport
from raydefect.scoring.schema import file_metadata
from raydefect.scoring.sizing import ResourcePlan, file_rows, plan_resources
from raydefect.scoring.sources import InputSpec, resolve_input
from raydefect.scoring.storage import Storage, absolute
from raydefect.scoring.store import ScoreStore

PROGRESS_POLL_S = 1.0


# --- the pipeline ----------------------------------------------------------------------------------------------


@dataclass
class _Setup:
    meta: Any
    storage: Storage
    spec: InputSpec
    store: ScoreStore
    model: str
    fetched: bool = False  # `model` is a temporary local copy of a remote artifact

    def cleanup(self) -> None:
        if self.fetched:
            shutil.rmtree(self.model, ignore_errors=True)


SLOW_STORE_S = 5.0  # a store that has not answered a run's first calls after this long is reported while it waits
NO_ANSWER_FAILS = {"s3": "about 10 s", "gs": "about 2 min"}  # measured: docs/guides/score.md's inputs


def _waiting_for(option: str, location: str) -> contextlib.AbstractContextManager:
    """Say so when object storage is slow to answer the checks before a run (an endpoint that accepts and never
    answers kept a run silent for 2 min on gs://); nothing for local paths."""
    scheme = split_scheme(location)[0]
    if not scheme:
        return contextlib.nullcontext()
    fails = NO_ANSWER_FAILS.get(scheme)
    then = f"a store that never answers fails after {fails}; " if fails else ""
    return console.waiting(
        f"{option} {location}: no answer yet after {SLOW_STORE_S:.0f} s, still waiting ({then}check the network, "
        "the endpoint and the credentials)",
        SLOW_STORE_S,
    )


def _setup(model: str, input_: str, out: str, sc: ScoreConfig) -> _Setup:
    """Everything checked before Ray starts: model, input, output (clear errors, no cluster needed)."""
    from raydefect.models.artifact import read_artifact_meta

    storage = Storage(sc.endpoint_override)
    fetched = is_remote(model)
    if fetched:
        with _waiting_for("--model", model):
            model = fetch_model(model, storage)
    try:
        meta = read_artifact_meta(model)
        if meta.computed_model_id() != meta.model_id:  # model.yaml edited by hand: the id describes what runs
            meta = dataclasses.replace(meta, model_id=meta.computed_model_id())
        if sc.threshold is not None:  # this run only: rows stay the model's (its id), the footer says so
            meta = dataclasses.replace(meta, thresholds={**meta.thresholds, "image": float(sc.threshold)})
        with _waiting_for("--input", input_):
            spec = resolve_input(input_, storage)
        return _Setup(meta, storage, spec, ScoreStore(out, storage), model, fetched)
    except BaseException:
        if fetched:
            shutil.rmtree(model, ignore_errors=True)
        raise


def _remote_args(sc: ScoreConfig, input_: str, out: str, spec: InputSpec) -> dict[str, Any]:
    """Forward credentials (score.forward_env, by name) to workers when a path is remote."""
    env = {k: os.environ[k] for k in sc.forward_env if k in os.environ}
    remote = is_remote(input_) or is_remote(out) or spec.kind == "manifest"
    return {"runtime_env": {"env_vars": env}} if env and remote else {}


def _pending(s: _Setup, sc: ScoreConfig, out: str, remote_args: dict, known_ref: list, counter: Any, tasks: int) -> Any:
    """listing -> drop what is already scored (stat key): the images a run will score; `tasks` listing tasks at once."""
    ds = listing_dataset(s.spec, s.storage, sc, out, remote_args, tasks, counter)
    return ds.map_batches(
        filter_known,
        batch_format="pyarrow",
        batch_size=None,
        fn_kwargs={"known": known_ref, "model_id": s.meta.model_id, "key_mode": sc.incremental_key,
                   "counter": counter},
        **light_stage(tasks),
        **remote_args,
    )  # fmt: skip


def list_pending(
    model: str, input_: str, out: str, cfg: Config | None = None, *, rescore: bool = False, address: str | None = None
) -> pa.Table:
    """Dry run: the images a run would score now (path, size, mtime_ns, error), without scoring or writing.

    With ``score.incremental_key=hash`` files whose path is known are listed too: their content is compared only
    when they are read during a run.
    """

    sc = (cfg or Config()).score
    s = _setup(model, input_, out, sc)
    try:
        return _list_pending(s, sc, input_, out, rescore, address)
    finally:
        s.cleanup()


def _list_pending(s: _Setup, sc: ScoreConfig, input_: str, out: str, rescore: bool, address: str | None) -> pa.Table:
    import ray

    from raydefect.pipelines.cluster import cluster_cpus, connect

    connect(address)
    quiet_ray_data()
    known = KeySet()
    if not rescore and s.store.exists():
        known = s.store.load_keys(s.meta.model_id, sc.incremental_key)
    known_ref = [ray.put(known.array)] if len(known) else []
    ds = _pending(s, sc, out, _remote_args(sc, input_, out, s.spec), known_ref, None, int(cluster_cpus()))
    parts = list(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    return pa.concat_tables(parts) if parts else pa.table({"path": pa.array([], pa.string())})


def run_score(
    model: str,
    input_: str,
    out: str,
    cfg: Config | None = None,
    *,
    rescore: bool = False,
    retry_errors: bool = False,
    address: str | None = None,
) -> ScoreReport:
    """Score every new or changed image of `input_` with the model artifact `model` into the scores folder `out`."""

    sc = (cfg or Config()).score
    s = _setup(model, input_, out, sc)
    try:
        return _run(s, sc, input_, out, rescore, retry_errors, address)
    finally:
        s.cleanup()


def _run(
    s: _Setup, sc: ScoreConfig, input_: str, out: str, rescore: bool, retry_errors: bool, address: str | None
) -> ScoreReport:
    """One scoring run, as named steps: open and lock the store, recover what a dead run left, connect, plan the
    cluster's share, build the Ray Data pipeline, consume it committing as it goes."""
    import ray

    from raydefect.pipelines.cluster import connect

    meta, store = s.meta, s.store
    with _waiting_for("--out", store.out):
        store.open()
    run_id = new_run_id()
    report = ScoreReport(run_id, meta.model_id, store.out, input_)
    with store.lock(run_id), ExitStack() as stack:
        report.recovery = store.recover(run_id)
        connect(address, log_dir=None if is_remote(store.out) else store.out)
        stack.enter_context(sigterm_as_interrupt())  # after ray.init, whose C++ handler only dumps a stack
        quiet_ray_data()
        remote_args = _remote_args(sc, input_, out, s.spec)
        known = KeySet() if rescore else store.load_keys(meta.model_id, sc.incremental_key, retry_errors, repair=True)
        console.info(
            f"scoring {input_} with model {meta.model_id} into {store.out} (run {run_id}; "
            + (
                "--rescore: every image is scored again)"
                if rescore
                else f"{len(known):,} image version(s) scored by this model before)"
            )
        )
        known_ref = [ray.put(known.array)] if len(known) else []
        counter = make_counter()
        plan = _plan_cluster(sc, report)
        record = RunRecord(run_id, meta.model_id, sc.incremental_key, input=absolute(input_))
        ds = _pending(s, sc, out, remote_args, known_ref, counter, plan.light)
        ds = _score_stages(ds, s, sc, run_id, remote_args, known_ref, counter, plan, report)
        store.write_record(record)  # only now: a run refused while planning (a manifest without a path column)
        _consume(ds, s, sc, record, report, counter, seen=KeySet() if rescore else known, rescore=rescore)
        if report.listed == 0:
            raise DataError(f"--input {input_}: no images found; check the path and score.extensions")
    return report


def _plan_cluster(sc: ScoreConfig, report: ScoreReport) -> ResourcePlan:
    """The cluster's share this run takes (`scoring.sizing`), and the device, engine and precision it reports."""
    import ray

    from raydefect.pipelines.cluster import cluster_cpus, cluster_gpus

    gpus, cpus = cluster_gpus(), cluster_cpus()
    nodes = max(1, len([n for n in ray.nodes() if n.get("Alive")]))
    plan = plan_resources(sc, gpus, cpus, nodes, cpu_workers())
    report.device, report.actors = plan.device, plan.actors
    # what the actors will run (an explicit 'onnx' on GPUs is refused here, before any work); 'auto' engine and
    # precision are resolved again in each actor, on its own node's CPU
    report.engine, report.precision = resolve_scoring(sc.engine, report.device, sc.precision)
    return plan


def _score_stages(
    ds: Any,
    s: _Setup,
    sc: ScoreConfig,
    run_id: str,
    remote_args: dict[str, Any],
    known_ref: list,
    counter: Any,
    plan: ResourcePlan,
    report: ScoreReport,
) -> Any:
    """The pending images -> decoded batches -> model outputs -> finished masks -> staged files (one row each)."""
    import ray

    meta, storage, store = s.meta, s.storage, s.store
    # strict: every block holds exactly batch_size rows (the last excepted); without it each input block leaves
    # a remainder of its own, and half the model batches held 2 or 3 images
    ds = ds.repartition(target_num_rows_per_block=sc.batch_size, strict=True)
    ds = ds.map_batches(
        decode_stage,
        batch_format="pyarrow",
        batch_size=sc.batch_size,
        compute=ray.data.TaskPoolStrategy(size=sc.decode_tasks) if sc.decode_tasks else None,
        num_cpus=sc.task_cpus,
        fn_kwargs={"image_size": meta.image_size, "storage": storage, "max_pixels": sc.max_image_pixels,
                   "reduced_jpeg": sc.reduced_jpeg, "geometry": meta.geometry.mode, "scale": meta.geometry.scale,
                   "key_mode": sc.incremental_key, "model_id": meta.model_id, "known": known_ref,
                   "counter": counter},
        **remote_args,
    )  # fmt: skip
    # A streaming repartition between stages keeps Ray Data from fusing them: decoding stays in parallel CPU
    # tasks instead of running inside the model actor, and masks are finished batch by batch instead of
    # piling up model outputs until a whole output file's worth of rows is there.
    ds = ds.repartition(target_num_rows_per_block=sc.batch_size, strict=True)
    ds = ds.map_batches(
        ModelActor,
        batch_format="numpy",
        batch_size=sc.batch_size,
        compute=ray.data.ActorPoolStrategy(size=plan.actors),
        num_gpus=plan.num_gpus,
        num_cpus=plan.actor_cpus,
        fn_constructor_kwargs=actor_kwargs(
            s.model,
            model_id=meta.model_id,
            device=report.device,
            precision=sc.precision,
            engine=sc.engine,
            threads=plan.threads,
            counter=counter,
        ),
        **remote_args,
    )
    ds = ds.map_batches(
        finish_stage,
        batch_format="numpy",
        batch_size=sc.batch_size,
        fn_kwargs={"meta": meta, "run_id": run_id},
        **light_stage(plan.light),
    )
    # Writes reserve no CPU either (see `light_stage`; writing Parquet of PNG bytes is light), and their different
    # request keeps Ray Data from fusing them with `finish_stage` (the fused task would wait for a whole file of model
    # outputs, float masks, before finishing any). A file is a whole number of model batches: otherwise each
    # write task also wrote a small file of the rows left over (2,000 rows in 64-row blocks: files of 2,000 and 48).
    return ds.map_batches(
        write_stage,
        batch_format="pyarrow",
        batch_size=file_rows(sc.rows_per_file, sc.batch_size),
        fn_kwargs={
            "staging": store.staging(run_id),
            "storage": storage,
            "metadata": file_metadata(meta, run_id, sc.incremental_key, threshold_override=sc.threshold),
            "key_mode": sc.incremental_key,
        },
        num_cpus=0,
        **remote_args,
    )


def _consume(
    ds: Any,
    s: _Setup,
    sc: ScoreConfig,
    record: RunRecord,
    report: ScoreReport,
    counter: Any,
    seen: KeySet,
    rescore: bool,
) -> None:
    """Run the pipeline: commit the staged files every score.commit_interval_s, report progress, and end the run
    (final commit, record state, staging removed) however it stops."""
    store = s.store
    start = time.perf_counter()
    stop = threading.Event()
    state = {"committed": 0, "start": start, "counter": counter}
    progress = threading.Thread(
        target=_progress, args=(counter, start, stop, state), daemon=True, name="raydefect-score-progress"
    )
    progress.start()
    pending: list[StagedFile] = []  # handed over, not committed yet; `_commit` empties it
    last_commit = time.monotonic()
    record.stats = {"listed": 0}
    guard = CommitGuard()
    try:
        # no prefetching: with it each written file reached this loop only when the next one was written (measured:
        # commits 4-5 s after the write), and the last file of a killed run would be lost for nothing
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
            pending.extend(StagedFile.from_row(row) for row in batch.to_pylist())
            if time.monotonic() - last_commit >= sc.commit_interval_s:
                _commit(store, record, pending, seen, report, state, guard)
                last_commit = time.monotonic()
        record.state = "finished"
    except BaseException as e:
        record.state = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        cause = user_error(e)  # e.g. an OutputError (disk full) raised in a Ray Data task: its one line
        if cause is not None and cause is not e:
            raise cause from None
        raise
    finally:
        stop.set()
        report.seconds = time.perf_counter() - start
        _end_run(store, record, pending, seen, report, state, guard, counter, rescore)


def _end_run(
    store: ScoreStore,
    record: RunRecord,
    pending: list[StagedFile],
    seen: KeySet,
    report: ScoreReport,
    state: dict,
    guard: CommitGuard,
    counter: Any,
    rescore: bool,
) -> None:
    """However the run stopped: count what it did, commit what is staged, record its state, remove its staging."""
    import ray

    counts = _snapshot(counter)
    report.listed, report.skipped = counts.get("listed", 0), counts.get("skipped", 0)
    report.repeated = counts.get("repeated", 0)
    report.storage_errors = counts.get("storage_errors", 0)
    report.model_seconds = counts.get("model_ms", 0) / 1000.0
    record.stats = {
        "listed": report.listed,
        "skipped": report.skipped,
        "seconds": round(report.seconds, 3),
        "rescore": rescore,
    }
    if record.state == "finished" and report.listed == 0:
        record.state = "failed"  # nothing to score is the user's error below, not a finished nightly run
    try:
        if not guard.forced:  # a commit cut by a second signal: the next run's recovery finishes it
            _commit(store, record, pending, seen, report, state, guard, stopping=record.state != "finished")
    finally:
        store.remove_staging(record.run_id)
        ray.kill(counter)
        if record.state == "interrupted":
            console.warn(
                f"run {record.run_id} interrupted: {report.scored:,} image(s) committed to {store.out}; the same "
                "command scores the rest (nothing committed is scored twice)"
            )


def _commit(
    store: ScoreStore,
    record: RunRecord,
    pending: list[StagedFile],
    seen: KeySet,
    report: ScoreReport,
    state: dict,
    guard: CommitGuard,
    stopping: bool = False,
) -> None:
    """Commit the files in `pending` (emptied as they are committed) and count them in `report`."""
    with guard.hold(stopping):
        store.check_lock()
        done = store.commit(record, pending, seen)
        for f in done:
            report.scored += f.rows
            report.errors += f.errors
            report.defects += f.defects
            report.files += 1
            for n in f.nodes:
                report.nodes[n] = report.nodes.get(n, 0) + f.rows
        state["committed"] = report.scored
    if done:
        scored = _snapshot(state["counter"]).get("scored", -1)
        report.timeline.append((round(time.perf_counter() - state["start"], 3), report.scored, scored))
        console.debug(f"committed {len(done)} file(s), {sum(f.rows for f in done):,} rows")


def _snapshot(counter: Any) -> dict[str, int]:
    import ray

    try:
        return ray.get(counter.snapshot.remote(), timeout=30)
    except Exception:  # progress figures must never fail a run
        return {}


def _progress(counter: Any, start: float, stop: threading.Event, state: dict) -> None:
    """Images scored of those to score (known once listing ends: a percentage and an ETA from then on)."""
    with console.progress("score") as bar:
        while not stop.wait(PROGRESS_POLL_S):
            c = _snapshot(counter)
            scored = c.get("scored", 0)
            listed = c.get("parts_total", 0) and c.get("parts_listed", 0) >= c["parts_total"]
            if listed and bar.total is None:
                bar.set_total(max(scored, c.get("listed", 0) - c.get("skipped", 0) - c.get("repeated", 0)))
            bar.note(f"listed {c.get('listed', 0):,}, already scored {c.get('skipped', 0):,}, "
                     f"committed {state['committed']:,}")  # fmt: skip
            bar.set_done(scored)
