"""The real magnetic tile data set imports with the one command docs/guides/prepare.md documents (issue 2 §4)."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from raydefect.cli import cli

_REPO = Path(__file__).resolve().parents[1]
_CANDIDATES = [
    Path(os.environ.get("RAYDEFECT_DATASETS", "/nonexistent")) / "magnetic_tile",
    Path("/work/shared/datasets/magnetic_tile"),
    _REPO.parent / "shared" / "datasets" / "magnetic_tile",
]
MAGNETIC_TILE = next((p for p in _CANDIDATES if p.is_dir()), None)


@pytest.mark.skipif(
    MAGNETIC_TILE is None,
    reason="magnetic tile data not found in $RAYDEFECT_DATASETS, /work/shared/datasets or ../shared/datasets",
)
def test_magnetic_tile_imports_with_the_documented_command(tmp_path):
    out = tmp_path / "magnetic_tile"
    args = ["prepare", "--images", f"{MAGNETIC_TILE}/MT_*/Imgs/*.jpg", "--mask-template", "{parent}/{stem}.png"]
    args += ["--class-regex", r"MT_(\w+)/", "--normal-class", "Free", "--out", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    assert len(rows) == 1344
    assert sum(r["label"] == 0 for r in rows) == 952
    classes = sorted({r["defect_class"] for r in rows} - {"normal"})
    assert classes == ["Blowhole", "Break", "Crack", "Fray", "Uneven"]
    empty = [r for r in rows if "empty_mask" in r["flags"]]
    assert len(empty) == 4 and {r["defect_class"] for r in empty} == {"Uneven"}
    assert any("empty mask" in line and line.split()[-1] == "4" for line in result.output.splitlines())
    for cls in classes:  # every defect class is in val and test
        assert {r["split"] for r in rows if r["defect_class"] == cls} == {"train", "val", "test"}
