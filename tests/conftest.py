"""Shared fixtures. One session-scoped local Ray for every test marked `ray` (starting Ray costs seconds)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download weights


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `gpu` tests without CUDA (they run on the GPU machine)."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch is a hard dependency
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_session():
    """An embedded local Ray shared by the whole session; logical CPUs > cores so small jobs can co-schedule."""
    import ray

    from raydefect.pipelines.cluster import connect

    connect(None, num_cpus=4)
    yield ray
    ray.shutdown()


TINY_CLASSES = ("normal", "scratch", "spot")


def build_tiny_model(backbone: str = "test-tiny", image_size: int = 32, seed: int = 0, **model_overrides):
    """A random tiny DefectModel (no weights are ever downloaded), seeded for reproducible tests."""
    import torch

    from raydefect.config import ModelConfig
    from raydefect.models.model import DefectModel

    torch.manual_seed(seed)
    cfg = ModelConfig(backbone=backbone, pretrained=False, **{"decoder_dim": 16, "head_hidden": 16, **model_overrides})
    return DefectModel(cfg, image_size, TINY_CLASSES).eval()


@pytest.fixture(scope="session")
def make_tiny_model():
    """`build_tiny_model(backbone="test-tiny", image_size=32, seed=0, **model_overrides)` as a fixture."""
    return build_tiny_model


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory):
    """Path of a saved model artifact: random `test-tiny` backbone, classes normal/scratch/spot, 32 px, thresholds
    0.5/0.5. Shared (read-only!) by model, scoring, predict and evaluate tests."""
    from raydefect.models.artifact import save_artifact

    out = tmp_path_factory.mktemp("artifact") / "model"
    save_artifact(
        build_tiny_model(),
        out,
        thresholds={"image": 0.5, "pixel": 0.5},
        metrics={"val_f1": 0.5, "val_iou": 0.25},
        extra={"note": "tiny random test model"},
    )
    return out


# --- synthetic data (issue 2 §3/§4): small, fast, session-scoped; reuse them in training/scoring tests ---------------

SYNTH_PER_CLASS = 8
SYNTH_NORMAL = 24
SYNTH_SIZE = 64


@pytest.fixture(scope="session")
def synth_raw(tmp_path_factory) -> dict:
    """Raw classic layout: 8 images per defect class (scratch, spot, crack, missing_piece) + 24 normal, 64 px.

    Returns `generate_raw`'s summary: keys out, defect_images, defect_masks, normal_images, images, ...
    Read-only: copy it if a test must change files.
    """
    from raydefect.data.synth import generate_raw

    return generate_raw(tmp_path_factory.mktemp("synth") / "raw", SYNTH_PER_CLASS, SYNTH_NORMAL, SYNTH_SIZE, seed=0)


@pytest.fixture(scope="session")
def synth_dataset(synth_raw, tmp_path_factory):
    """`synth_raw` prepared (split 0.8/0.1/0.1, seed 0, absolute paths): a `raydefect.data.manifest.Dataset`.

    56 images, classes [normal, crack, missing_piece, scratch, spot]; every class has train, val and test images.
    """
    from raydefect.data.importers import import_classic
    from raydefect.data.manifest import load_dataset
    from raydefect.data.prepare import prepare_dataset

    listing = import_classic(synth_raw["defect_images"], synth_raw["defect_masks"], synth_raw["normal_images"])
    out = tmp_path_factory.mktemp("synth") / "dataset"
    prepare_dataset(listing, out, workers=1)
    return load_dataset(out)


@pytest.fixture(scope="session")
def synth_archive(tmp_path_factory) -> dict:
    """An unlabelled archive for scoring: 40 files in nested folders, PNG and JPEG, 3 corrupt, 64 px.

    Returns `generate_archive`'s summary: keys out (the folder), truth_csv (path, kind, defect_class,
    mask_pixels, corrupt_reason), files, corrupt, kinds.
    """
    from raydefect.data.synth import generate_archive

    return generate_archive(tmp_path_factory.mktemp("synth") / "archive", 40, SYNTH_SIZE, seed=0, n_corrupt=3)


# --- training (issue 3 §3/§4): a tiny, fast training config for the synthetic data --------------------------------


def tiny_backbone_weights() -> str:
    """A local weights file for `test-tiny` (seeded random values), so tiny trainings run the three stages of a
    pretrained backbone (a random-init backbone trains whole, `engine.schedule.plan_stages`)."""
    import tempfile
    from pathlib import Path

    path = Path(tempfile.gettempdir()) / f"raydefect-tests-{os.getuid()}" / "test-tiny.safetensors"
    if not path.is_file():
        import torch
        from safetensors.torch import save_file

        from raydefect.models.factory import create_backbone

        torch.manual_seed(0)
        state = {k: v.contiguous() for k, v in create_backbone("test-tiny", 32).state_dict().items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        save_file(state, str(tmp))
        os.replace(tmp, path)
    return str(path)


TINY_TRAIN_SETS = (
    "model.backbone=test-tiny",
    "model.pretrained=true",
    "model.decoder_dim=32",
    "model.head_hidden=32",
    "model.drop_path_rate=0.0",
    "data.image_size=32",
    "data.loader_threads=1",
    "optim.lr=0.003",
    "optim.head_lr=0.003",
    "schedule.frozen_epochs=1",
    "schedule.partial_epochs=1",
    "schedule.full_epochs=1",
    "schedule.warmup_epochs=0",
    "train.batch_size=8",
    "train.eval_batch_size=16",
)


def tiny_train_config(dataset=None, runs_dir=None, *sets: str):
    """A `Config` that trains `test-tiny` at 32 px in seconds (3 epochs: one per stage); `sets` override it."""
    from raydefect.config import load_config

    extra = [f"model.weights={tiny_backbone_weights()}"]
    if dataset is not None:
        extra.append(f"data.dataset={dataset}")
    if runs_dir is not None:
        extra.append(f"train.runs_dir={runs_dir}")
    return load_config(None, sets=[*TINY_TRAIN_SETS, *extra, *sets])


@pytest.fixture(scope="session")
def make_train_config():
    """`tiny_train_config(dataset=None, runs_dir=None, *sets)` as a fixture (training and tuning tests)."""
    return tiny_train_config


def run_result_script(code: str, timeout: float = 900):
    """Run ``code`` in a fresh Python process (for a `ray.cluster_utils.Cluster`: pytest's own process already has
    the session's Ray) that prints one ``RESULT <json>`` line; returns (the completed process, that JSON)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line is not None, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(line[7:])


@pytest.fixture(scope="session")
def run_script():
    """`run_result_script(code, timeout=900) -> (CompletedProcess, dict)` as a fixture (two-node cluster tests)."""
    return run_result_script


@pytest.fixture(scope="module")
def s3_server():
    """A moto S3 server on loopback with a bucket ``factory``; AWS_* variables set so the driver and (forwarded) Ray
    workers reach it. Yields a boto3 client."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    from raydefect.scoring.storage import _filesystem

    _filesystem.cache_clear()  # filesystems are cached per bucket: one made for an earlier module's server is dead
    client = boto3.client("s3")
    client.create_bucket(Bucket="factory")
    yield client
    server.stop()
    _filesystem.cache_clear()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def gcs_server():
    """A Google Cloud Storage emulator (gcp-storage-emulator, in memory, with GCS's upload preconditions added) on
    loopback with a bucket ``factory``; STORAGE_EMULATOR_HOST set so the driver and (forwarded) Ray workers reach it.
    Yields its address.

    In its own process: served from a thread of the test process, it waited for the GIL that pyarrow's Parquet
    footer read holds while it waits for the answer (each read then took a 60 s request timeout)."""
    import socket
    import subprocess

    with socket.socket() as s:  # a free port: the emulator does not report the one it bound
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # the emulator with GCS's upload preconditions added (tests/gcs_emulator.py), which the gs:// lock relies on
    emulator = str(Path(__file__).with_name("gcs_emulator.py"))
    cmd = [sys.executable, emulator, "start", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen([*cmd, "--in-memory", "--default-bucket", "factory", "--quiet"])
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"the GCS emulator did not start on port {port} ({' '.join(cmd)})")
            time.sleep(0.1)
    address = f"http://127.0.0.1:{port}"
    saved = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = address
    from raydefect.scoring.storage import _filesystem

    _filesystem.cache_clear()
    yield address
    proc.terminate()
    proc.wait(timeout=30)
    _filesystem.cache_clear()
    if saved is None:
        os.environ.pop("STORAGE_EMULATOR_HOST", None)
    else:
        os.environ["STORAGE_EMULATOR_HOST"] = saved


@pytest.fixture
def no_ray_token(monkeypatch, tmp_path) -> Path:
    """No Ray authentication token anywhere (HOME is a new empty folder, returned) and RAY_AUTH_MODE unset; what the
    code under test sets is undone afterwards."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "")  # recorded first, so that a value set by the code is undone
    monkeypatch.delenv("RAY_AUTH_MODE")
    return home


@pytest.fixture
def one_thread():
    """Tiny models are fastest on one thread (and the CI machine has two cores shared with other tests); test files
    that train them use it for every test: ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
