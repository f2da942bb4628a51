"""The dataset reader every other module uses (training, tuning, evaluation): contract 1 of docs/architecture.md.

A dataset is a folder with ``manifest.parquet`` (one row per image) and ``dataset.yaml`` (schema version, class
list with "normal" first, counts, the importer and its arguments). Paths in the manifest are absolute, or relative
to the folder for self-contained (``prepare --copy``) datasets; `Dataset` always hands out absolute paths.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from raydefect.data.splits import SPLITS
from raydefect.errors import DataError
from raydefect.paths import is_uri

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    import pyarrow as pa

DATASET_SCHEMA_VERSION = 1
MANIFEST = "manifest.parquet"
DATASET_YAML = "dataset.yaml"
PROBLEMS_CSV = "problems.csv"
REQUIRED_COLUMNS = ("image", "mask", "label", "defect_class", "split", "width", "height", "mask_fraction", "sha1")
_FIX = "create it with `raydefect prepare ... --out DIR` and pass that folder"


@dataclass(frozen=True)
class Dataset:
    """A prepared dataset: `info` from dataset.yaml, `table` as stored, helpers that give absolute paths."""

    root: Path
    info: dict[str, Any]
    table: pa.Table

    @property
    def class_names(self) -> list[str]:
        """Index = class id; "normal" is 0."""
        return list(self.info["classes"])

    @property
    def num_classes(self) -> int:
        return len(self.info["classes"])

    def __len__(self) -> int:
        return self.table.num_rows

    def _absolute(self, path: str | None) -> str | None:
        if path is None:
            return None
        return path if os.path.isabs(path) or is_uri(path) else str(self.root / path)

    def frame(self, split: str | None = None) -> pd.DataFrame:
        """The manifest as pandas, image/mask paths absolute; optionally one split (may be empty)."""
        import pandas as pd
        import pyarrow.compute as pc

        if split is not None and split not in SPLITS:
            raise DataError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        table = self.table if split is None else self.table.filter(pc.equal(self.table.column("split"), split))
        df = table.to_pandas()
        df["image"] = [self._absolute(p) for p in table.column("image").to_pylist()]
        # object dtype keeps None for "no mask" (a str column would turn it into NaN)
        df["mask"] = pd.Series([self._absolute(p) for p in table.column("mask").to_pylist()], dtype=object)
        if self.has_class_masks:
            df["class_mask"] = pd.Series(
                [self._absolute(p) for p in table.column("class_mask").to_pylist()], dtype=object
            )
        return df

    @property
    def has_class_masks(self) -> bool:
        """Per-pixel classes: a ``class_mask`` column (index PNGs, dataset class ids) in a dataset that uses it.
        Datasets prepared from binary masks, and older ones, have none."""
        return bool(self.info.get("mask_classes")) and "class_mask" in self.table.column_names

    def split(self, name: str) -> pd.DataFrame:
        """Rows of one split with absolute paths; an empty split is an error that says how to fix it."""
        df = self.frame(name)
        if df.empty:
            raise DataError(
                f"{self.root}: the {name!r} split is empty; re-run `raydefect prepare` with more images or a "
                f"non-zero fraction for it (--split train,val,test)"
            )
        return df

    def records(self, name: str) -> list[dict[str, Any]]:
        """`split(name)` as plain dicts (easy to ship to workers)."""
        return self.split(name).to_dict("records")

    def counts(self) -> dict[str, dict[str, int]]:
        """class -> split -> number of images, from the manifest itself."""
        out = {c: dict.fromkeys(SPLITS, 0) for c in self.class_names}
        for cls, sp in zip(
            self.table.column("defect_class").to_pylist(), self.table.column("split").to_pylist(), strict=True
        ):
            out.setdefault(cls, dict.fromkeys(SPLITS, 0))[sp] += 1
        return out


def load_dataset(path: str | Path) -> Dataset:
    """Open a dataset folder (or its manifest.parquet / dataset.yaml); every defect raises `DataError` with a fix."""
    import pyarrow.parquet as pq

    root = Path(path)
    if root.name in (MANIFEST, DATASET_YAML) and root.is_file():
        root = root.parent
    if root.exists() and not root.is_dir():
        raise DataError(f"{root} is a file, not a folder: a dataset is the folder `raydefect prepare` wrote; {_FIX}")
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist; {_FIX}")
    manifest, info_path = root / MANIFEST, root / DATASET_YAML
    for p in (manifest, info_path):
        if not p.is_file():
            raise DataError(f"{root} is not a prepared dataset ({p.name} is missing); {_FIX}")
    try:
        info = yaml.safe_load(info_path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise DataError(f"{info_path}: cannot read it ({e}); re-run `raydefect prepare`") from None
    if not isinstance(info, dict):
        raise DataError(f"{info_path}: not a dataset description; re-run `raydefect prepare`")
    version = info.get("schema_version")
    if version != DATASET_SCHEMA_VERSION:
        raise DataError(
            f"{info_path}: dataset schema version {version!r} is not supported (this raydefect reads "
            f"{DATASET_SCHEMA_VERSION}); re-run `raydefect prepare` with this version"
        )
    try:
        table = pq.read_table(manifest)
    except Exception as e:  # any Arrow error: a damaged file
        raise DataError(f"{manifest}: cannot read it ({e}); re-run `raydefect prepare`") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise DataError(f"{manifest}: missing column(s) {', '.join(missing)}; re-run `raydefect prepare`")
    classes = info.get("classes")
    if not isinstance(classes, list) or not classes or classes[0] != "normal":
        raise DataError(f"{info_path}: 'classes' must list the classes with 'normal' first; re-run `raydefect prepare`")
    unknown = set(table.column("defect_class").to_pylist()) - set(classes)
    if unknown:
        raise DataError(f"{manifest}: classes {sorted(unknown)} are not in {info_path}; re-run `raydefect prepare`")
    if info.get("paths") == "relative":
        _check_inside(root, manifest, table)
    return Dataset(root.resolve(), info, table)


def _check_inside(root: Path, manifest: Path, table: Any) -> None:
    """A self-contained (``--copy``) dataset names its files relative to its folder; a hand-edited row with an
    absolute path or ``..`` climbing out would make readers (and anything copying the folder) leave it."""
    for column in ("image", "mask", "class_mask"):
        if column not in table.column_names:  # class_mask: only datasets with per-pixel classes
            continue
        for i, value in enumerate(table.column(column).to_pylist()):
            if value is None:
                continue
            parts = Path(value).parts
            if os.path.isabs(value) or is_uri(value) or ".." in parts:
                raise DataError(
                    f"{manifest}: row {i} {column} {value!r} points outside the dataset folder {root} (this dataset "
                    "was prepared with --copy: paths must be relative and inside it); fix the row or re-run "
                    "`raydefect prepare`"
                )
