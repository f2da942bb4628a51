"""Issue 7 §3: safety. No unpickling of arbitrary code, safe YAML only, no shell strings, manifests that cannot
climb out of their dataset folder. (Malicious .pth weights: tests/test_weights.py::test_pickled_objects_are_refused;
the Jobs submission's argv: tests/test_score_cli.py::test_submit_builds_a_safe_entrypoint_and_passes_secrets_by_name.)
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydefect.errors import ArtifactError, DataError

REPO = Path(__file__).parents[1]
CODE = sorted([*(REPO / "raydefect").rglob("*.py"), *(REPO / "jobs").rglob("*.py")])


def _hits(pattern: str) -> list[str]:
    rx = re.compile(pattern)
    return [
        f"{p.relative_to(REPO)}:{i}: {line.strip()}"
        for p in CODE
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if rx.search(line)
    ]


def test_the_grep_sees_the_package():
    assert len(CODE) > 30 and any(p.relative_to(REPO).as_posix() == "raydefect/cli/app.py" for p in CODE)
    assert _hits(r"yaml\.safe_load\(")  # the pattern style finds real calls


def test_yaml_is_only_ever_safe_loaded():
    assert _hits(r"yaml\.load\(|yaml\.unsafe_load|yaml\.full_load|Loader\s*=") == []


def test_no_shell_strings():
    assert _hits(r"shell\s*=\s*True|os\.system\(|os\.popen\(|commands\.getoutput|subprocess\.getoutput") == []


def test_torch_load_is_always_weights_only():
    calls = _hits(r"torch\.load\(")
    assert calls and all("weights_only=True" in c for c in calls), calls


class _Exploit:
    """Unpickling this runs `Path(marker).touch()`: what a malicious checkpoint would do with os.system."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_malicious_pickle_in_a_checkpoint_is_refused_and_never_runs(make_tiny_model, tmp_path):
    import torch

    from raydefect.engine.checkpoint import (
        TrainState,
        load_optimizer_state,
        save_checkpoint,
        validate_checkpoint,
    )

    ckpt = tmp_path / "checkpoint_epoch_0001"
    save_checkpoint(ckpt, make_tiny_model(), None, TrainState(epoch=1))
    marker = tmp_path / "pwned"
    torch.save({"state": _Exploit(str(marker))}, ckpt / "optimizer.pt")
    with pytest.raises(ArtifactError, match=r"optimizer\.pt: damaged"):
        validate_checkpoint(ckpt)
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        load_optimizer_state(ckpt)
    assert not marker.exists()


def test_artifacts_hold_no_pickle(tiny_artifact):
    """The model artifact is safetensors + YAML: nothing in it could be unpickled."""
    files = sorted(p.name for p in Path(tiny_artifact).iterdir())
    assert files == ["model.safetensors", "model.yaml"]
    head = (Path(tiny_artifact) / "model.safetensors").read_bytes()[:16]
    assert not head.startswith(b"\x80") and not head.startswith(b"PK")  # not a pickle, not a torch zip


def _edited_copy(synth_raw, tmp_path, image: str) -> Path:
    from raydefect.data.importers import import_classic
    from raydefect.data.prepare import prepare_dataset

    listing = import_classic(synth_raw["defect_images"], synth_raw["defect_masks"], synth_raw["normal_images"])
    out = tmp_path / "ds"
    prepare_dataset(listing, out, copy=True, workers=1)
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    rows[3]["image"] = image
    schema = pq.read_schema(out / "manifest.parquet")
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), out / "manifest.parquet")
    return out


@pytest.mark.parametrize("bad", ["../../../etc/passwd", "/etc/passwd", "images/../../outside.png"])
def test_a_hand_edited_copied_manifest_cannot_point_outside_its_folder(synth_raw, tmp_path, bad):
    from raydefect.data.manifest import load_dataset

    out = _edited_copy(synth_raw, tmp_path, bad)
    with pytest.raises(DataError, match=r"row 3 image .* points outside the dataset folder"):
        load_dataset(out)
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    with pytest.raises(DataError, match="outside"):
        load_dataset(moved)  # wherever the folder goes
