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
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raydefect import console
from raydefect.config import Config, ScoreConfig
from raydefect.data.pool import cpu_workers
from raydefect.errors import ConfigError, DataError, Terminated, error_text
from raydefect.inference import resolve_scoring
from raydefect.paths import is_remote, split_scheme
from raydefect.pipelines.cluster import quiet_ray_data
from raydefect.pipelines.failures import user_error
from raydefect.scoring.keys import RETRY_PREFIX, KeySet
from raydefect.scoring.schema import file_metadata
from raydefect.scoring.scorer import Decoder, ModelStep, drop_known, finish, listing_table, stat_locations
from raydefect.scoring.sources import (
    InputSpec,
    ListFilter,
    ListPart,
    Storage,
    absolute,
    join_location,
    manifest_column,
    output_folder,
    plan_listing,
    resolve_input,
    walk,
)
from raydefect.scoring.store import Recovery, RunRecord, ScoreStore, StagedFile, new_run_id, write_staged

PROGRESS_EVERY_S = 10.0


@dataclass
class ScoreReport:
    """What one run did; `summary_lines` is what the CLI prints."""

    run_id: str
    model_id: str
    out: str
    input: str
    listed: int = 0
    skipped: int = 0
    repeated: int = 0  # listing entries naming a file already listed (a manifest with a path twice)
    scored: int = 0
    errors: int = 0
    storage_errors: int = 0  # of `errors`: files the storage failed to read (network, timeout), scored again next run
    defects: int = 0
    files: int = 0
    seconds: float = 0.0
    nodes: dict[str, int] = field(default_factory=dict)
    recovery: Recovery = field(default_factory=Recovery)
    # (seconds since start, rows committed, images the model had scored by then): how far commits trail scoring
    timeline: list[tuple[float, int, int]] = field(default_factory=list)
    device: str = "cpu"  # where the model actors run: "cuda" when the cluster has GPUs
    engine: str = "torch"  # what runs the model there: "torch" or "onnx" (ONNX Runtime, CPU)
    precision: str = "fp32"  # "bf16" (autocast) or "fp32", as resolved on the driver's machine
    actors: int = 1
    model_seconds: float = 0.0  # time the model actors spent in their batches (all actors summed)

    @property
    def images_per_s(self) -> float:
        return self.scored / self.seconds if self.seconds > 0 else 0.0

    def summary_lines(self) -> list[str]:
        lines = [
            f"run {self.run_id}  model {self.model_id}",
            f"images:   {self.scored:,} scored ({self.images_per_s:,.1f} images/s in {self.seconds:.1f} s), "
            f"{self.skipped:,} already scored, {self.listed:,} listed"
            + (f" ({self.repeated:,} listed twice, scored once)" if self.repeated else ""),
            f"defects:  {self.defects:,}",
            f"errors:   {self.errors:,} (rows with `error` set)"
            + (
                f"; {self.storage_errors:,} of them the storage failed to read: scored again by the next run"
                if self.storage_errors
                else ""
            ),
            f"output:   {self.out} ({self.files} new file(s))",
            f"model:    {self.actors} actor(s) on {self.device} "
            f"({'ONNX Runtime' if self.engine == 'onnx' else 'PyTorch'}, {self.precision})",
        ]
        if len(self.nodes) > 1:
            lines.append("nodes:    " + ", ".join(f"{n[:8]}: {c:,}" for n, c in sorted(self.nodes.items())))
        r = self.recovery
        if r.adopted_files or r.recovered_rows or r.interrupted_runs:
            lines.append(
                f"recovered: {len(r.interrupted_runs)} interrupted run(s), {r.recovered_rows:,} staged rows kept, "
                f"{r.dropped_rows:,} duplicates dropped, {r.adopted_files} file(s) adopted"
            )
        return lines

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["images_per_s"] = round(self.images_per_s, 2)
        return d


# --- stage functions (run on Ray workers) --------------------------------------------------------------------


def _count(counter: Any, **values: int) -> None:
    if counter is not None:
        counter.add.remote(values)


def _list_part(batch: dict[str, np.ndarray], spec: InputSpec, storage: Storage, filt: ListFilter):
    for raw in batch["part"]:
        d = json.loads(raw)
        part = ListPart(walk=d["walk"], files=tuple(tuple(f) for f in d["files"]))
        for rows in walk(part, spec, storage, filt):
            yield listing_table(rows)


def _manifest_rows(table: pa.Table, column: str, base: str, storage: Storage) -> pa.Table:
    entries = []
    for value in table.column(column).to_pylist():
        text = (str(value) if value is not None else "").strip()
        if text and not text.startswith("#"):
            entries.append(join_location(base, text))
    return stat_locations(entries, storage)


def _filter_known(table: pa.Table, known: list, model_id: str, key_mode: str, counter: Any) -> pa.Table:
    import ray

    n = table.num_rows
    repeated = n - pc.count_distinct(table.column("path")).as_py() if n else 0  # a manifest naming a file twice
    if key_mode == "stat":
        table = drop_known(table, ray.get(known[0]) if known else None, model_id)
    _count(counter, listed=n, skipped=n - table.num_rows - repeated, repeated=repeated)
    return table


def _decode(table: pa.Table, image_size: int, storage: Storage, max_pixels: int, key_mode: str, model_id: str,
            known: list, counter: Any, reduced_jpeg: bool = True) -> dict[str, np.ndarray]:  # fmt: skip
    import ray

    known_arr = ray.get(known[0]) if known and key_mode == "hash" else None
    out = Decoder(image_size, storage, max_pixels, key_mode, model_id, known_arr, reduced_jpeg)(table)
    if key_mode == "hash":
        _count(counter, skipped=table.num_rows - len(out["path"]))
    unread = sum(1 for e in out["error"] if e.startswith(RETRY_PREFIX))
    if unread:
        _count(counter, storage_errors=unread)
    return out


class _ModelActor:
    """A model replica. The artifact's files come through the object store (`artifact`: the ref of their bytes, see
    `_actor_kwargs`), so the nodes need no shared disk; they are written to a temporary folder only while loading."""

    def __init__(
        self,
        artifact: tuple[Any],
        model_id: str,
        device: str,
        precision: str,
        engine: str,
        threads: int | None,
        counter: Any,
    ):
        import tempfile

        import ray

        with tempfile.TemporaryDirectory(prefix="raydefect-model-") as folder:  # gone once the weights are loaded
            for name, data in ray.get(artifact[0]).items():
                (Path(folder) / name).write_bytes(data)
            self.step = ModelStep(folder, device=device, precision=precision, threads=threads, engine=engine)
        if self.step.meta.model_id != model_id:
            raise RuntimeError(f"model actor loaded model {self.step.meta.model_id}, expected {model_id}")
        self.node_id = ray.get_runtime_context().get_node_id()
        self.counter = counter

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        out = self.step(batch)
        out["node_id"] = np.asarray([self.node_id] * len(out["path"]), dtype=object)
        _count(self.counter, scored=len(out["path"]), model_ms=int(1000 * (time.perf_counter() - start)))
        return out


def _finish(batch: dict[str, np.ndarray], meta: Any, run_id: str) -> pa.Table:
    return finish(batch, meta, run_id)


def _write(table: pa.Table, staging: str, storage: Storage, metadata: dict[str, str], key_mode: str) -> pa.Table:
    import ray

    info = write_staged(table, staging, storage, metadata, key_mode, ray.get_runtime_context().get_node_id())
    return pa.table({k: [v] for k, v in info.items()})


def _make_counter() -> Any:
    import ray

    @ray.remote(num_cpus=0)
    class Counter:
        def __init__(self) -> None:
            self.values: dict[str, int] = {}

        def add(self, values: dict[str, int]) -> None:
            for k, v in values.items():
                self.values[k] = self.values.get(k, 0) + int(v)

        def snapshot(self) -> dict[str, int]:
            return dict(self.values)

    return Counter.remote()


# --- the pipeline ----------------------------------------------------------------------------------------------


def _artifact_files(model: str) -> dict[str, bytes]:
    from raydefect.models.artifact import META_FILE, WEIGHTS_FILE, resolve_artifact_dir

    folder = resolve_artifact_dir(model)
    return {name: (folder / name).read_bytes() for name in (META_FILE, WEIGHTS_FILE) if (folder / name).exists()}


def _actor_kwargs(model: str, **kwargs: Any) -> dict[str, Any]:
    """`_ModelActor`'s constructor arguments: the artifact's bytes are put in the object store once and travel as a
    ref in a tuple (not resolved by Ray: the actor gets them itself). Ray Data keys a callable class by its
    arguments, by ``repr`` when they are unhashable: with the bytes among them (a dict), the driver built a string
    ~2.8x the weights' size while planning every run (a ViT-S: 252 MB, 1-3 s of CPU; a ViT-L's 1.2 GB of weights
    would make ~3.4 GB) and pickled the weights once more into the plan (the driver's CPU per 384-image run: 6.4 s
    before, 4.6 s after)."""
    import ray

    return {"artifact": (ray.put(_artifact_files(model)),), **kwargs}


def _fetch_model(location: str, storage: Storage) -> str:
    """A model artifact on object storage -> a local temporary copy (the driver reads it; actors get the bytes)."""
    import tempfile

    from raydefect.errors import ArtifactError
    from raydefect.models.artifact import META_FILE, WEIGHTS_FILE

    folder = Path(tempfile.mkdtemp(prefix="raydefect-model-"))
    for name in (META_FILE, WEIGHTS_FILE):
        try:
            (folder / name).write_bytes(storage.read_bytes(location.rstrip("/") + "/" + name))
        except OSError as e:
            raise ArtifactError(
                f"--model {location}: cannot read {name} ({error_text(e)}); pass the model folder's URI"
            ) from None
    return str(folder)


def _light(tasks: int) -> dict[str, Any]:
    """Remote args of a light stage (listing, finishing masks): no CPU reservation, at most `tasks` at once. Ray Data
    reserves CPUs for its stages upstream first: a stage that reserved a CPU behind the listing would wait for the
    whole listing, and one behind decoding for the last image (measured: nothing decoded until 8,000 files were
    listed, no mask finished while images remained to decode, all output files committed in a run's last seconds)."""
    import ray

    return {"num_cpus": 0, "compute": ray.data.TaskPoolStrategy(size=max(1, tasks))}


def _listing_dataset(
    spec: InputSpec, storage: Storage, sc: ScoreConfig, out: str, remote_args: dict, tasks: int
) -> Any:
    import ray

    if spec.kind == "manifest":
        loc = spec.location(spec.root)
        fs, path = storage.resolve(loc)
        base = spec.location(spec.root.rsplit("/", 1)[0] if "/" in spec.root else ".")
        if spec.manifest_format == "parquet":
            import pyarrow.parquet as pq

            with fs.open_input_file(path) as f:
                names = pq.read_schema(f).names
            column = manifest_column(names, loc)
            ds = ray.data.read_parquet(path, filesystem=fs, num_cpus=0, concurrency=tasks, **remote_args)
            ds = ds.select_columns([column])
        elif spec.manifest_format == "csv":
            with fs.open_input_stream(path) as f:
                header = f.read(64 * 1024).decode("utf-8", "replace").splitlines()[:1]
            names = [h.strip() for h in header[0].split(",")] if header else []
            if not names:
                raise DataError(f"{loc}: empty CSV manifest; write a header line 'path' and one path per line")
            column = manifest_column(names, loc)
            ds = ray.data.read_csv(path, filesystem=fs, num_cpus=0, concurrency=tasks, **remote_args)
            ds = ds.select_columns([column])
        else:
            column = "text"
            ds = ray.data.read_text(path, filesystem=fs, num_cpus=0, concurrency=tasks, **remote_args)
        return ds.map_batches(
            _manifest_rows,
            batch_format="pyarrow",
            batch_size=1000,
            fn_kwargs={"column": column, "base": base, "storage": storage},
            **_light(tasks),
            **remote_args,
        )
    filt = ListFilter(
        spec.root,
        extensions=sc.extensions if spec.kind == "dir" else (),
        pattern=spec.pattern,
        exclude=output_folder(spec, out),
    )
    cpus = int(ray.cluster_resources().get("CPU", 1))
    parts = plan_listing(spec, storage, filt, min_parts=max(8, 2 * cpus))
    if not parts:
        what = f"files matching {spec.pattern}" if spec.pattern else f"images ({', '.join(sc.extensions)})"
        raise DataError(f"--input {spec.text}: no {what} found; check the path (and score.extensions)")
    items = [{"part": json.dumps({"walk": p.walk, "files": [list(f) for f in p.files]})} for p in parts]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    return ds.map_batches(
        _list_part,
        batch_size=1,
        batch_format="numpy",
        fn_kwargs={"spec": spec, "storage": storage, "filt": filt},
        **_light(tasks),
        **remote_args,
    )


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
NO_ANSWER_FAILS = {"s3": "about 10 s", "gs": "about 2 min"}  # measured: the README's score inputs


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
            model = _fetch_model(model, storage)
    try:
        meta = read_artifact_meta(model)
        if meta.computed_model_id() != meta.model_id:  # model.yaml edited by hand: the id describes what runs
            meta = dataclasses.replace(meta, model_id=meta.computed_model_id())
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
    ds = _listing_dataset(s.spec, s.storage, sc, out, remote_args, tasks)
    return ds.map_batches(
        _filter_known,
        batch_format="pyarrow",
        batch_size=None,
        fn_kwargs={"known": known_ref, "model_id": s.meta.model_id, "key_mode": sc.incremental_key,
                   "counter": counter},
        **_light(tasks),
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
    import ray

    from raydefect.pipelines.cluster import cluster_cpus, cluster_gpus, connect

    meta, storage, store = s.meta, s.storage, s.store
    with _waiting_for("--out", store.out):
        store.open()
    run_id = new_run_id()
    report = ScoreReport(run_id, meta.model_id, store.out, input_)
    with store.lock(run_id), ExitStack() as stack:
        report.recovery = store.recover(run_id)
        connect(address)
        stack.enter_context(_sigterm_as_interrupt())  # after ray.init, whose C++ handler only dumps a stack
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
        counter = _make_counter()
        gpus, cpus = cluster_gpus(), cluster_cpus()
        nodes = max(1, len([n for n in ray.nodes() if n.get("Alive")]))
        actors, actor_cpus = resolve_actors(sc, gpus, cpus, nodes, cpu_workers())
        num_gpus = 1 if gpus >= actors else (gpus / actors if gpus else 0)
        threads = sc.model_threads or (None if num_gpus else max(1, cpu_workers() // -(-actors // nodes)))
        report.device, report.actors = ("cuda" if num_gpus else "cpu"), actors
        _check_cpus_left(actors, actor_cpus, cpus)
        task_cpus = sc.task_cpus
        light = int(cpus - actors * actor_cpus)  # listing and finishing tasks at once (they reserve no CPU)
        # what the actors will run (an explicit 'onnx' on GPUs is refused here, before any work); 'auto' engine and
        # precision are resolved again in each actor, on its own node's CPU
        report.engine, report.precision = resolve_scoring(sc.engine, report.device, sc.precision)
        record = RunRecord(run_id, meta.model_id, sc.incremental_key, input=absolute(input_))
        ds = _pending(s, sc, out, remote_args, known_ref, counter, light)
        # strict: every block holds exactly batch_size rows (the last excepted); without it each input block leaves
        # a remainder of its own, and half the model batches held 2 or 3 images
        ds = ds.repartition(target_num_rows_per_block=sc.batch_size, strict=True)
        ds = ds.map_batches(
            _decode,
            batch_format="pyarrow",
            batch_size=sc.batch_size,
            compute=ray.data.TaskPoolStrategy(size=sc.decode_tasks) if sc.decode_tasks else None,
            num_cpus=task_cpus,
            fn_kwargs={"image_size": meta.image_size, "storage": storage, "max_pixels": sc.max_image_pixels,
                       "reduced_jpeg": sc.reduced_jpeg,
                       "key_mode": sc.incremental_key, "model_id": meta.model_id, "known": known_ref,
                       "counter": counter},
            **remote_args,
        )  # fmt: skip
        # A streaming repartition between stages keeps Ray Data from fusing them: decoding stays in parallel CPU
        # tasks instead of running inside the model actor, and masks are finished batch by batch instead of
        # piling up model outputs until a whole output file's worth of rows is there.
        ds = ds.repartition(target_num_rows_per_block=sc.batch_size, strict=True)
        ds = ds.map_batches(
            _ModelActor,
            batch_format="numpy",
            batch_size=sc.batch_size,
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_gpus=num_gpus,
            num_cpus=actor_cpus,
            fn_constructor_kwargs=_actor_kwargs(
                s.model,
                model_id=meta.model_id,
                device=report.device,
                precision=sc.precision,
                engine=sc.engine,
                threads=threads,
                counter=counter,
            ),
            **remote_args,
        )
        ds = ds.map_batches(
            _finish,
            batch_format="numpy",
            batch_size=sc.batch_size,
            fn_kwargs={"meta": meta, "run_id": run_id},
            **_light(light),
        )
        # Writes reserve no CPU either (see `_light`; writing Parquet of PNG bytes is light), and their different
        # request keeps Ray Data from fusing them with `_finish` (the fused task would wait for a whole file of model
        # outputs, float masks, before finishing any). A file is a whole number of model batches: otherwise each
        # write task also wrote a small file of the rows left over (2,000 rows in 64-row blocks: files of 2,000 and 48).
        ds = ds.map_batches(
            _write,
            batch_format="pyarrow",
            batch_size=file_rows(sc.rows_per_file, sc.batch_size),
            fn_kwargs={
                "staging": store.staging(run_id),
                "storage": storage,
                "metadata": file_metadata(meta, run_id, sc.incremental_key),
                "key_mode": sc.incremental_key,
            },
            num_cpus=0,
            **remote_args,
        )
        seen = KeySet() if rescore else known
        store.write_record(record)  # only now: a run refused while planning (a manifest without a path column)
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
        guard = _CommitGuard()
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
                store.remove_staging(run_id)
                ray.kill(counter)
                if record.state == "interrupted":
                    console.warn(
                        f"run {run_id} interrupted: {report.scored:,} image(s) committed to {store.out}; the same "
                        "command scores the rest (nothing committed is scored twice)"
                    )
        if report.listed == 0:
            raise DataError(f"--input {input_}: no images found; check the path and score.extensions")
    return report


@contextmanager
def _signals(handler: Callable[[int, Any], None], *signums: int) -> Iterator[None]:
    """`handler` for `signums` over the block, the previous handlers after it. Main thread only, as Python's signal
    handlers (elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {n: signal.signal(n, handler) for n in signums}
    try:
        yield
    finally:
        for n, p in previous.items():
            signal.signal(n, p if p is not None else signal.SIG_DFL)


def _interrupt(signum: int) -> KeyboardInterrupt:
    """What a stopping signal raises in the driver: `Terminated` for SIGTERM (exit 143), else KeyboardInterrupt."""
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _sigterm_as_interrupt() -> contextlib.AbstractContextManager[None]:
    """SIGTERM raises `Terminated` (a KeyboardInterrupt) in the driver, so the run commits what it holds and is marked
    interrupted as on Ctrl-C (measured: Ray's own handler printed a C++ stack twice, aborted, and left the run marked
    failed with its last files uncommitted)."""

    def handler(signum: int, frame: Any) -> None:
        raise _interrupt(signum)

    return _signals(handler, signal.SIGTERM)


def file_rows(rows_per_file: int, batch_size: int) -> int:
    """Rows per output file: score.rows_per_file rounded down to whole model batches (when it holds one)."""
    return rows_per_file - rows_per_file % batch_size if rows_per_file >= batch_size else rows_per_file


def resolve_actors(
    sc: ScoreConfig, gpus: float, cpus: float, nodes: int = 1, cores: int | None = None
) -> tuple[int, float]:
    """(model replicas, CPUs each reserves) from score.model_actors / score.actor_cpus and the cluster: with GPUs
    `default_actors` and 1 CPU each; without, one replica per CPU (at most `CPU_ACTORS_PER_NODE` per node) that
    together reserve half of the CPUs."""
    if gpus > 0:
        actor_cpus = 1.0 if sc.actor_cpus is None else sc.actor_cpus
        return sc.model_actors or default_actors(gpus, cpus, actor_cpus, sc.actors_per_gpu), actor_cpus
    actors = sc.model_actors or default_actors(0, cpus, 0.0, 0, nodes, cores)
    if sc.actor_cpus is not None:
        return actors, sc.actor_cpus
    # at most half the CPUs, and one CPU always left to the other stages (a one-CPU machine: the actor reserves none)
    return actors, max(0.0, min(cpus / 2, cpus - 1)) / actors


#: Default CPU replicas per node: beyond this, replicas get more threads each instead (memory: one model per replica).
CPU_ACTORS_PER_NODE = 8


def default_actors(
    gpus: float, cpus: float, actor_cpus: float, per_gpu: int, nodes: int = 1, cores: int | None = None
) -> int:
    """Model replicas when score.model_actors is null. Without GPUs, one per CPU, at most `CPU_ACTORS_PER_NODE` per
    node, each on one thread: on 2 cores, two single-threaded replicas scored 256 px images at 0.91 of the bare
    forward where one two-threaded replica reached 0.72 -- whenever a decode or write task takes a core, both of its
    threads wait at every operation. With GPUs, `per_gpu` per GPU (they share it, so
    one computes while another's batch is (de)serialised: measured on an H200 with dinov3-b, 1, 2 and 4 replicas
    reached 0.67, 0.86 and 0.94 of the bare forward), fewer if they would hold more than half the CPUs that decode
    for them, never fewer than one per GPU; always the same number on every GPU, so that each takes 1/k of one."""
    if gpus <= 0:
        per_node = CPU_ACTORS_PER_NODE
        # one node is the driver's own (Ray has no other kind of driver): no more replicas than its cores (an embedded
        # Ray may be given more logical CPUs than cores, as the tests' 4 on 2)
        if nodes <= 1 and cores:
            per_node = min(per_node, cores)
        return max(1, min(int(cpus), per_node * max(1, nodes)))
    whole = max(1, int(gpus))
    return whole * max(1, min(per_gpu, int(cpus / 2 / actor_cpus) // whole))


def _check_cpus_left(actors: int, actor_cpus: float, cpus: float) -> None:
    """The model actors hold their CPUs for the whole run: if they took every CPU, no decode task could ever start
    and Ray Data would wait forever (also with less than one CPU left: measured, a one-CPU Ray whose actor held half
    of it never finished)."""
    need = 1.0
    if cpus - actors * actor_cpus < need:
        raise ConfigError(
            f"score.model_actors={actors} x score.actor_cpus={actor_cpus:g} reserve {actors * actor_cpus:g} of the "
            f"cluster's {cpus:g} CPUs, leaving less than {need:g} to decode images: lower score.model_actors or "
            "score.actor_cpus, or add CPUs"
        )


class _CommitGuard:
    """Ctrl-C and SIGTERM wait for a commit in progress to end: cut between moving a file and recording it, the run's
    final commit repeated the move of a file already moved (measured: "No such file or directory", a traceback,
    exit 1 instead of 130). The signal is raised once the commit is done; a second one during the commit stops at
    once (`forced`: the run commits nothing more, and the next run adopts what this commit moved). Main thread only,
    as Python's signal handlers."""

    def __init__(self) -> None:
        self.forced = False

    @contextmanager
    def hold(self, stopping: bool = False) -> Iterator[None]:
        """Defer SIGINT/SIGTERM over the block; `stopping` (the final commit of a run already stopping): a signal
        forces at once."""
        received: list[int] = []

        def handler(signum: int, frame: Any) -> None:
            if received or stopping:
                self.forced = True
                console.warn("stopping at once, in the middle of a commit: the next run finishes it")
                raise _interrupt(signum)
            received.append(signum)
            console.warn("stopping after the commit in progress (again to stop at once)")

        with _signals(handler, signal.SIGINT, signal.SIGTERM):
            yield
        if received:
            raise _interrupt(received[0])


def _commit(
    store: ScoreStore,
    record: RunRecord,
    pending: list[StagedFile],
    seen: KeySet,
    report: ScoreReport,
    state: dict,
    guard: _CommitGuard,
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
    while not stop.wait(PROGRESS_EVERY_S):
        c = _snapshot(counter)
        elapsed = time.perf_counter() - start
        scored = c.get("scored", 0)
        console.info(
            f"  {elapsed:6.0f} s  listed {c.get('listed', 0):,}  already scored {c.get('skipped', 0):,}  "
            f"scored {scored:,} ({scored / elapsed:,.1f}/s)  committed {state['committed']:,}"
        )
