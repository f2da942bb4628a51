"""The dataset reader: absolute paths, splits, and a DataError with a fix for every broken dataset."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from raydefect.data.manifest import load_dataset
from raydefect.errors import DataError


def test_reader_gives_absolute_paths_class_names_and_split_rows(synth_dataset):
    ds = synth_dataset
    assert ds.class_names == ["normal", "crack", "missing_piece", "scratch", "spot"] and ds.num_classes == 5
    assert len(ds) == 56
    val = ds.split("val")
    assert len(val) == 7 and set(val["split"]) == {"val"}
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in val["image"])
    records = ds.records("train")
    normal = [r for r in records if r["label"] == 0]
    defect = [r for r in records if r["label"] == 1]
    assert normal and all(r["mask"] is None and r["defect_class"] == "normal" for r in normal)
    assert defect and all(Path(r["mask"]).is_file() and r["mask_fraction"] > 0 for r in defect)
    assert all(ds.class_names[r["class_id"]] == r["defect_class"] for r in records)


def test_a_path_to_the_manifest_or_yaml_works_too(synth_dataset):
    assert len(load_dataset(synth_dataset.root / "manifest.parquet")) == 56
    assert len(load_dataset(synth_dataset.root / "dataset.yaml")) == 56


@pytest.fixture
def copy_of(synth_dataset, tmp_path) -> Path:
    dst = tmp_path / "ds"
    shutil.copytree(synth_dataset.root, dst)
    return dst


def test_missing_folder_or_files(tmp_path, copy_of):
    with pytest.raises(DataError, match="does not exist; create it with `raydefect prepare"):
        load_dataset(tmp_path / "nope")
    (copy_of / "manifest.parquet").unlink()
    with pytest.raises(DataError, match="manifest.parquet is missing"):
        load_dataset(copy_of)


def test_wrong_schema_version(copy_of):
    info = yaml.safe_load((copy_of / "dataset.yaml").read_text())
    info["schema_version"] = 99
    (copy_of / "dataset.yaml").write_text(yaml.safe_dump(info))
    with pytest.raises(DataError, match="schema version 99 is not supported.*re-run `raydefect prepare`"):
        load_dataset(copy_of)


def test_damaged_manifest_or_missing_columns(copy_of):
    (copy_of / "manifest.parquet").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot read it"):
        load_dataset(copy_of)
    pq.write_table(pa.table({"image": ["a.png"]}), copy_of / "manifest.parquet")
    with pytest.raises(DataError, match="missing column"):
        load_dataset(copy_of)


def test_empty_split_and_unknown_split(copy_of):
    table = pq.read_table(copy_of / "manifest.parquet")
    table = table.set_column(table.schema.get_field_index("split"), "split", pa.array(["train"] * len(table)))
    pq.write_table(table, copy_of / "manifest.parquet")
    ds = load_dataset(copy_of)
    with pytest.raises(DataError, match="the 'test' split is empty"):
        ds.split("test")
    with pytest.raises(DataError, match="unknown split 'valid'"):
        ds.split("valid")
