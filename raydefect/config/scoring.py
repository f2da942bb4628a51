"""The config sections of bulk scoring and of the resources Ray gives each job (`raydefect.config.sections` holds
the others and the `Config` that joins them)."""

from __future__ import annotations

from dataclasses import dataclass

from raydefect.config.fields import IMAGE_EXTENSIONS
from raydefect.config.fields import check as _check
from raydefect.config.fields import doc_field as _f


@dataclass(frozen=True)
class ScoreConfig:
    batch_size: int = _f(32, "Images per model batch.")
    rows_per_file: int = _f(
        5000, "Upper bound of rows per output Parquet file (rounded down to whole model batches: 4992 by default)."
    )
    model_actors: int | None = _f(
        None,
        "Model replicas in the actor pool; default: score.actors_per_gpu per GPU; without GPUs one single-threaded "
        "replica per CPU, at most 8 per node and on one node no more than its cores (independent replicas keep "
        "computing while decode tasks take a core; one replica's threads all wait for the slowest).",
    )
    actors_per_gpu: int = _f(
        4,
        "Replicas per GPU when model_actors is null (fewer if they would hold over half the CPUs): while one "
        "replica's batch moves through Ray, another computes. Lower it for a model that does not fit that often.",
    )
    decode_tasks: int | None = _f(None, "Parallel decode tasks; default: Ray Data's choice.")
    extensions: tuple[str, ...] = _f(IMAGE_EXTENSIONS, "File extensions picked up from folders and globs.")
    incremental_key: str = _f("stat", "Change detection: 'stat' (path, size, mtime) or 'hash' (content).")
    precision: str = _f("auto", "'auto' (bf16 on GPU and on CPUs with native bf16, else fp32), 'bf16' or 'fp32'.")
    engine: str = _f(
        "torch",
        "'torch', 'onnx' (ONNX Runtime, CPU only; no faster than PyTorch on the 2-core dev machine, may be on larger "
        "CPUs) or 'auto' (ONNX Runtime on CPU when installed, else PyTorch).",
    )
    max_image_pixels: int = _f(178_956_970, "Larger images are recorded as errors (decompression bombs).")
    reduced_jpeg: bool = _f(
        True,
        "Decode JPEGs of at least twice the model's input size at 1/2, 1/4 or 1/8 scale (libjpeg DCT scaling) "
        "before the resize: decoding and resizing a camera-size JPEG 2.5-5x faster; the model's input moves by ~0.5 "
        "grey levels on average (99th percentile 2). false decodes every image in full, as predict and evaluate do.",
    )
    commit_interval_s: float = _f(
        30.0, "Commit written files at least this often (seconds): a killed run loses at most this much work."
    )
    actor_cpus: float | None = _f(
        None,
        "CPUs reserved per model actor (the other stages' tasks use the rest); default: 1 with GPUs, else the "
        "actors together reserve half of the CPUs and leave at least one (they compute on every core; Ray's "
        "reservations only place them).",
    )
    task_cpus: float = _f(
        1.0,
        "CPUs each decode task reserves (listing, mask-finishing and write tasks reserve none, so that they never "
        "wait for a reservation held upstream). Less than 1 runs more tasks at once in more Ray workers: at 0.25, "
        "camera-size images scored at 5.9 images/s instead of 10.5 on 2 cores.",
    )
    model_threads: int | None = _f(
        None, "torch threads per model actor on CPU; default: the node's CPUs divided by the actors (at least 1)."
    )
    threshold: float | None = _f(
        None,
        "Image threshold for this run instead of the model's (`score --threshold`); recorded in the Parquet footer "
        "(raydefect.threshold_override). To change the model's own: `raydefect thresholds`.",
    )
    endpoint_override: str | None = _f(
        None, "S3-compatible endpoint for s3:// paths, e.g. http://minio:9000 (AWS_ENDPOINT_URL works too)."
    )
    forward_env: tuple[str, ...] = _f(
        (
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_REGION",
            "AWS_DEFAULT_REGION",
            "AWS_ENDPOINT_URL",
            "AWS_ENDPOINT_URL_S3",
            "GOOGLE_APPLICATION_CREDENTIALS",
            "STORAGE_EMULATOR_HOST",
        ),
        "Variables copied from the driver's environment to Ray workers when a path is remote (names only here).",
    )

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "score.batch_size", "must be >= 1")
        _check(self.threshold is None or 0 <= self.threshold <= 1, "score.threshold", "must be in [0, 1]")
        _check(self.commit_interval_s >= 0, "score.commit_interval_s", "must be >= 0 (0 commits every file)")
        _check(self.actor_cpus is None or self.actor_cpus > 0, "score.actor_cpus", "must be > 0")
        _check(self.task_cpus > 0, "score.task_cpus", "must be > 0")
        _check(self.model_threads is None or self.model_threads >= 1, "score.model_threads", "must be >= 1")
        _check(self.rows_per_file >= 1, "score.rows_per_file", "must be >= 1")
        _check(self.model_actors is None or self.model_actors >= 1, "score.model_actors", "must be >= 1")
        _check(self.actors_per_gpu >= 1, "score.actors_per_gpu", "must be >= 1")
        _check(self.decode_tasks is None or self.decode_tasks >= 1, "score.decode_tasks", "must be >= 1")
        _check(
            all(isinstance(e, str) and e.startswith(".") for e in self.extensions),
            "score.extensions",
            "must be a list of extensions that start with '.', e.g. ['.jpg', '.png']",
        )
        _check(
            self.incremental_key in ("stat", "hash"),
            "score.incremental_key",
            f"must be 'stat' or 'hash', got {self.incremental_key!r}",
        )
        _check(
            self.precision in ("auto", "bf16", "fp32"),
            "score.precision",
            f"must be 'auto', 'bf16' or 'fp32', got {self.precision!r}",
        )
        _check(
            self.engine in ("auto", "torch", "onnx"),
            "score.engine",
            f"must be 'auto', 'torch' or 'onnx', got {self.engine!r}",
        )


@dataclass(frozen=True)
class ResourcesConfig:
    num_workers: int = _f(1, "Ray Train workers (data-parallel replicas).")
    use_gpu: str = _f("auto", "'auto' (GPUs when the cluster has them), 'yes' or 'no'.")
    cpus_per_worker: float = _f(1.0, "CPUs reserved per training worker.")
    gpus_per_worker: float = _f(1.0, "GPUs per training worker when GPUs are used.")

    def __post_init__(self) -> None:
        _check(self.num_workers >= 1, "resources.num_workers", "must be >= 1")
        _check(
            self.use_gpu in ("auto", "yes", "no"),
            "resources.use_gpu",
            f"must be 'auto', 'yes' or 'no', got {self.use_gpu!r}",
        )
        _check(self.cpus_per_worker > 0, "resources.cpus_per_worker", "must be > 0")
        _check(self.gpus_per_worker > 0, "resources.gpus_per_worker", "must be > 0")
