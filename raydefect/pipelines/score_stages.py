"""The stages of `raydefect score`'s Ray Data pipeline, run on Ray workers: listing, decoding, the model actor,
finishing masks, writing staged files, and the counter actor the driver reads progress from. Each wraps a
Ray-free step of `raydefect.scoring`; `raydefect.pipelines.score` chains them and commits what they write.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raydefect.config import ScoreConfig
from raydefect.errors import DataError, error_text
from raydefect.scoring.keys import RETRY_PREFIX
from raydefect.scoring.listing import ListFilter, ListPart, plan_listing, walk
from raydefect.scoring.records import write_staged
from raydefect.scoring.scorer import Decoder, ModelStep, drop_known, finish, listing_table, stat_locations
from raydefect.scoring.sources import InputSpec, manifest_column, output_folder
from raydefect.scoring.storage import Storage, join_location


def _count(counter: Any, **values: int) -> None:
    if counter is not None:
        counter.add.remote(values)


def _list_part(batch: dict[str, np.ndarray], spec: InputSpec, storage: Storage, filt: ListFilter, counter: Any = None):
    for raw in batch["part"]:
        d = json.loads(raw)
        part = ListPart(walk=d["walk"], files=tuple(tuple(f) for f in d["files"]))
        for rows in walk(part, spec, storage, filt):
            yield listing_table(rows)
        _count(counter, parts_listed=1)  # all parts listed: the driver knows how many images there are to score


def _manifest_rows(table: pa.Table, column: str, base: str, storage: Storage) -> pa.Table:
    entries = []
    for value in table.column(column).to_pylist():
        text = (str(value) if value is not None else "").strip()
        if text and not text.startswith("#"):
            entries.append(join_location(base, text))
    return stat_locations(entries, storage)


def filter_known(table: pa.Table, known: list, model_id: str, key_mode: str, counter: Any) -> pa.Table:
    import ray

    n = table.num_rows
    repeated = n - pc.count_distinct(table.column("path")).as_py() if n else 0  # a manifest naming a file twice
    if key_mode == "stat":
        table = drop_known(table, ray.get(known[0]) if known else None, model_id)
    _count(counter, listed=n, skipped=n - table.num_rows - repeated, repeated=repeated)
    return table


def decode_stage(table: pa.Table, image_size: int, storage: Storage, max_pixels: int, key_mode: str, model_id: str,
            known: list, counter: Any, reduced_jpeg: bool = True, geometry: str = "square",
            scale: float = 1.0) -> dict[str, np.ndarray]:  # fmt: skip
    import ray

    known_arr = ray.get(known[0]) if known and key_mode == "hash" else None
    out = Decoder(image_size, storage, max_pixels, key_mode, model_id, known_arr, reduced_jpeg, geometry, scale)(table)
    if key_mode == "hash":
        _count(counter, skipped=table.num_rows - len(out["path"]))
    unread = sum(1 for e in out["error"] if e.startswith(RETRY_PREFIX))
    if unread:
        _count(counter, storage_errors=unread)
    return out


class ModelActor:
    """A model replica. The artifact's files come through the object store (`artifact`: the ref of their bytes, see
    `actor_kwargs`), so the nodes need no shared disk; they are written to a temporary folder only while loading."""

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


def finish_stage(batch: dict[str, np.ndarray], meta: Any, run_id: str) -> pa.Table:
    return finish(batch, meta, run_id)


def write_stage(table: pa.Table, staging: str, storage: Storage, metadata: dict[str, str], key_mode: str) -> pa.Table:
    import ray

    info = write_staged(table, staging, storage, metadata, key_mode, ray.get_runtime_context().get_node_id())
    return pa.table({k: [v] for k, v in info.items()})


def make_counter() -> Any:
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


def artifact_files(model: str) -> dict[str, bytes]:
    from raydefect.models.artifact import META_FILE, WEIGHTS_FILE, resolve_artifact_dir

    folder = resolve_artifact_dir(model)
    return {name: (folder / name).read_bytes() for name in (META_FILE, WEIGHTS_FILE) if (folder / name).exists()}


def actor_kwargs(model: str, **kwargs: Any) -> dict[str, Any]:
    """`ModelActor`'s constructor arguments: the artifact's bytes are put in the object store once and travel as a
    ref in a tuple (not resolved by Ray: the actor gets them itself). Ray Data keys a callable class by its
    arguments, by ``repr`` when they are unhashable: with the bytes among them (a dict), the driver built a string
    ~2.8x the weights' size while planning every run (a ViT-S: 252 MB, 1-3 s of CPU; a ViT-L's 1.2 GB of weights
    would make ~3.4 GB) and pickled the weights once more into the plan (the driver's CPU per 384-image run: 6.4 s
    before, 4.6 s after)."""
    import ray

    return {"artifact": (ray.put(artifact_files(model)),), **kwargs}


def fetch_model(location: str, storage: Storage) -> str:
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


def light_stage(tasks: int) -> dict[str, Any]:
    """Remote args of a light stage (listing, finishing masks): no CPU reservation, at most `tasks` at once. Ray Data
    reserves CPUs for its stages upstream first: a stage that reserved a CPU behind the listing would wait for the
    whole listing, and one behind decoding for the last image (measured: nothing decoded until 8,000 files were
    listed, no mask finished while images remained to decode, all output files committed in a run's last seconds)."""
    import ray

    return {"num_cpus": 0, "compute": ray.data.TaskPoolStrategy(size=max(1, tasks))}


def listing_dataset(
    spec: InputSpec, storage: Storage, sc: ScoreConfig, out: str, remote_args: dict, tasks: int, counter: Any = None
) -> Any:
    """The images `spec` names, listed in parallel parts (counted in `counter`: parts_total, then parts_listed)."""
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
            **light_stage(tasks),
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
    _count(counter, parts_total=len(items))
    return ds.map_batches(
        _list_part,
        batch_size=1,
        batch_format="numpy",
        fn_kwargs={"spec": spec, "storage": storage, "filt": filt, "counter": counter},
        **light_stage(tasks),
        **remote_args,
    )
