"""Issue 7 §1: a corpus of bad inputs through `prepare`, `predict`, `score` and `evaluate`.

Every file gets a recorded reason (problems.csv row, `error` column or error row) or a correct result; none crashes
the job, none comes out silently wrong (a 16-bit image is not black, a CMYK one not inverted). Unreadable
permissions: the tests run as root here, and chmod 000 does not stop root, so that case runs in a child process
that drops to uid 65534 (nobody) first; the corpus also holds files no user can read as images whatever the
permissions (a FIFO -- which would block a plain open() forever --, a folder named x.png, broken and looping links).
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from raydefect.errors import ImageError
from raydefect.imaging import decode_image, read_bytes
from raydefect.paths import glob_files, printable_path

BAD_NAME = b"bad\xffname.png"  # not UTF-8
LONG_NAME = "L" * 251 + ".png"  # 255 bytes, the usual file-name limit
SPACED = "sp ace ünï/ïmage 1.png"


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A 60-byte PNG whose IHDR declares width x height pixels (a decompression bomb's header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b"")
    )


def _good_rgb(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (48, 48, 3), dtype=np.uint8)


# name -> what every command must say: ("ok", None) or ("error", a substring of the recorded reason)
EXPECTED = {
    "good.png": ("ok", None),
    "trunc.jpg": ("error", "truncated"),
    "trunc.png": ("error", "truncated"),
    "zero.png": ("error", "0 bytes"),
    "text.png": ("error", "not a recognised image"),
    "jpeg_named.png": ("ok", None),  # wrong extension, valid image: decoded by content
    "bomb.png": ("error", "pixels"),
    "gray16.png": ("ok", None),
    "cmyk.jpg": ("ok", None),
    "palette.png": ("ok", None),
    "rgba.png": ("ok", None),
    "anim.tif": ("ok", None),  # multi-page TIFF: first page
    "loop_a.png": ("error", "link loop"),
    "loop_b.png": ("error", "link loop"),
    "dangling.png": ("error", ""),  # "file not found" / "broken link"
    "fifo.png": ("error", "not a regular file"),
    LONG_NAME: ("ok", None),
    SPACED: ("ok", None),
}


def make_corpus(root: Path) -> Path:
    """Write the bad-input corpus into `root` (see EXPECTED, plus the non-UTF-8 name and folder tricks)."""
    root.mkdir(parents=True)
    good = _good_rgb()
    png, jpg = _encode(Image.fromarray(good), "PNG"), _encode(Image.fromarray(good), "JPEG", quality=90)
    (root / "good.png").write_bytes(png)
    (root / "trunc.jpg").write_bytes(jpg[: len(jpg) // 2])
    (root / "trunc.png").write_bytes(png[: len(png) // 2])
    (root / "zero.png").write_bytes(b"")
    (root / "text.png").write_text("I am a text file, not a PNG\n")
    (root / "jpeg_named.png").write_bytes(_encode(Image.fromarray(_good_rgb(1)), "JPEG", quality=90))
    (root / "bomb.png").write_bytes(bomb_png())
    ramp = np.linspace(0, 65535, 48 * 48).reshape(48, 48).astype(np.uint16)  # full 16-bit range
    (root / "gray16.png").write_bytes(_encode(Image.fromarray(ramp), "PNG"))
    (root / "cmyk.jpg").write_bytes(_encode(Image.new("CMYK", (48, 48), (0, 255, 255, 0)), "JPEG", quality=95))
    (root / "palette.png").write_bytes(_encode(Image.fromarray(_good_rgb(2)).convert("P"), "PNG"))
    rgba = np.dstack([_good_rgb(3), np.full((48, 48), 255, np.uint8)])
    (root / "rgba.png").write_bytes(_encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    pages = [Image.new("L", (48, 48), v) for v in (30, 220)]
    (root / "anim.tif").write_bytes(_encode(pages[0], "TIFF", save_all=True, append_images=pages[1:]))
    os.symlink("loop_b.png", root / "loop_a.png")
    os.symlink("loop_a.png", root / "loop_b.png")
    os.symlink("nowhere.png", root / "dangling.png")
    os.mkfifo(root / "fifo.png")
    (root / "folder.png").mkdir()  # a folder named like an image: not an image, never opened
    (root / "sub").mkdir()
    os.symlink("..", root / "sub" / "up")  # a folder link back to a parent: must not be walked forever
    with open(os.fsencode(root) + b"/" + BAD_NAME, "wb") as f:
        f.write(png)
    (root / LONG_NAME).write_bytes(_encode(Image.fromarray(_good_rgb(4)), "PNG"))
    (root / SPACED).parent.mkdir()
    (root / SPACED).write_bytes(_encode(Image.fromarray(_good_rgb(5)), "PNG"))
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("bad") / "corpus")


BAD_NAME_TEXT = printable_path(os.fsdecode(BAD_NAME))  # 'bad\\xffname.png'


def _check_good_pixels(name: str, arr: np.ndarray) -> None:
    """What a correct decode of each odd-but-valid file looks like (never black, never inverted)."""
    if name == "gray16.png":
        assert 100 < arr.mean() < 155 and arr.max() >= 250  # the ramp kept its range
    elif name == "cmyk.jpg":
        r, g, b = arr[24, 24].astype(int)
        assert r > 200 and g < 60 and b < 60  # red, not cyan
    elif name == "anim.tif":
        assert abs(float(arr.mean()) - 30) < 3  # the first page


def test_decoding_the_corpus_gives_arrays_or_typed_errors(corpus):
    for name, (outcome, reason) in EXPECTED.items():
        if outcome == "ok":
            arr = decode_image(corpus / name)
            assert arr.shape == (48, 48, 3) and arr.dtype == np.uint8, name
            _check_good_pixels(name, arr)
        else:
            with pytest.raises(ImageError, match=reason or "."):
                decode_image(corpus / name)
            if name in ("loop_a.png", "loop_b.png", "dangling.png", "fifo.png"):
                with pytest.raises(ImageError, match=reason or "."):
                    read_bytes(corpus / name)  # what prepare uses: never blocks on the FIFO


def test_star_star_globs_do_not_follow_a_link_to_a_parent(corpus):
    found = glob_files(str(corpus / "**" / "*.png"))
    assert len(found) == len(set(found))
    assert not [f for f in found if "/up/" in f]  # Python's glob would repeat the tree ~40 times here
    assert str(corpus / SPACED) in found and str(corpus / "loop_a.png") in found


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    fmt=st.sampled_from(["PNG", "JPEG", "TIFF", "GIF", "BMP", "WEBP"]),
    cut=st.floats(0.0, 1.0),
    flips=st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(0, 255)), max_size=4),
)
def test_damaged_files_never_escape_as_untyped_errors(fmt, cut, flips):
    """Property: any truncation or byte damage of a valid image gives a uint8 array or an ImageError, nothing else."""
    data = bytearray(_encode(Image.fromarray(_good_rgb(7)), fmt))
    for where, value in flips:
        data[int(where * (len(data) - 1))] = value
    data = bytes(data[: max(0, int(cut * len(data)))] if cut < 0.999 else data)
    try:
        arr = decode_image(data, path=f"damaged.{fmt.lower()}", max_pixels=10_000_000)
    except ImageError as e:
        assert e.path == f"damaged.{fmt.lower()}" and e.reason
        return
    assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3


@given(st.binary(min_size=1, max_size=40).filter(lambda b: b"/" not in b and b"\0" not in b))
def test_printable_path_is_utf8_and_identity_on_valid_names(raw):
    name = os.fsdecode(raw)
    text = printable_path(name)
    text.encode("utf-8")  # never raises
    try:
        raw.decode("utf-8")
        assert text == name
    except UnicodeDecodeError:
        assert "\\x" in text


def _problems(path: Path) -> dict[str, dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return {Path(r["file"]).name if "/sp ace" not in r["file"] else SPACED: r for r in csv.DictReader(f)}


def test_prepare_records_every_bad_file_and_keeps_the_good_ones(corpus, tmp_path):
    from raydefect.data.importers import import_classic
    from raydefect.data.manifest import load_dataset
    from raydefect.data.prepare import prepare_dataset

    raw = tmp_path / "raw"
    shutil.copytree(corpus, raw / "normal", symlinks=True, ignore=shutil.ignore_patterns("fifo.png", "bad*"))
    os.mkfifo(raw / "normal" / "fifo.png")
    with open(os.fsencode(raw / "normal") + b"/" + BAD_NAME, "wb") as f:
        f.write((corpus / "good.png").read_bytes())
    defects, masks = raw / "defects" / "scratch", raw / "masks" / "scratch"
    defects.mkdir(parents=True)
    masks.mkdir(parents=True)
    m = np.zeros((48, 48), np.uint8)
    m[10:20, 10:30] = 255
    for i in range(5):
        (defects / f"d{i}.png").write_bytes(_encode(Image.fromarray(_good_rgb(10 + i)), "PNG"))
    (masks / "d0.png").write_bytes(_encode(Image.fromarray(m), "PNG"))
    (masks / "d1.png").write_bytes(_encode(Image.fromarray(m[:24, :24]), "PNG"))  # wrong size
    (masks / "d2.png").write_bytes(_encode(Image.fromarray(np.dstack([m, m, m])), "PNG"))  # RGB mask: luminance
    (masks / "d3.png").write_bytes(_encode(Image.fromarray(m.astype(np.uint16) * 257), "PNG"))  # 16-bit mask
    (masks / "d4.png").write_bytes(b"")  # empty mask file
    listing = import_classic(defects.parent, masks.parent, raw / "normal")
    out = tmp_path / "ds"
    report = prepare_dataset(listing, out, workers=1)

    problems = _problems(out / "problems.csv")
    for name, (outcome, reason) in EXPECTED.items():
        if outcome == "error":
            assert name in problems, (name, sorted(problems))
            assert problems[name]["action"] == "skipped" and reason in problems[name]["detail"], problems[name]
    assert problems[BAD_NAME_TEXT]["reason"] == "file name not UTF-8"
    assert problems["d1.png"]["reason"] == "mask size mismatch" and "24x24" in problems["d1.png"]["detail"]
    assert problems["d4.png"]["reason"] == "unreadable mask"

    ds = load_dataset(out)
    kept = {Path(p).name: r for p, r in zip(ds.table.column("image").to_pylist(), ds.table.to_pylist(), strict=True)}
    good = {n for n, (o, _) in EXPECTED.items() if o == "ok"}
    assert {Path(n).name for n in good} | {"d0.png", "d2.png", "d3.png"} == set(kept)
    assert report.images == len(kept)
    for name in ("d0.png", "d2.png", "d3.png"):  # RGB and 16-bit masks give the same binary mask
        assert kept[name]["mask_fraction"] == pytest.approx((m > 0).mean())
    assert all(r["width"] == 48 and r["height"] == 48 for r in kept.values())


def _predict_rows(out: Path) -> dict[str, dict]:
    with open(out / "scores.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return {r["path"]: r for r in rows}


def test_predict_gives_a_row_per_file_with_errors_for_bad_ones(corpus, tiny_artifact, tmp_path):
    from raydefect.tasks.predict import predict_images

    summary = predict_images(tiny_artifact, corpus, tmp_path / "pred", batch_size=4, workers=1)
    rows = _predict_rows(tmp_path / "pred")
    for name, (outcome, reason) in EXPECTED.items():
        row = rows[str(corpus / name)]
        if outcome == "ok":
            assert row["error"] == "" and 0.0 <= float(row["defect_score"]) <= 1.0, (name, row)
            assert (tmp_path / "pred" / row["overlay"]).is_file()
        else:
            assert row["error"] and reason in row["error"] and row["defect_score"] == "", (name, row)
    assert rows[str(corpus / BAD_NAME_TEXT)]["error"] == ""  # scored; its name escaped in the CSV
    assert str(corpus / "folder.png") not in rows and not [p for p in rows if "/up/" in p]
    assert summary.images == len(rows) == len(EXPECTED) + 1
    assert summary.errors == sum(o == "error" for o, _ in EXPECTED.values())


_AS_NOBODY = """
import os, sys
from raydefect.imaging import decode_image, read_bytes
from raydefect.errors import CorruptImageError
decode_image(sys.argv[2])  # import every lazy Pillow plugin while root (the interpreter may live under /root)
os.setgid(65534); os.setuid(65534)
for f in (read_bytes, decode_image):
    try:
        f(sys.argv[1])
    except CorruptImageError as e:
        print(e.reason)
    else:
        print("READ")
"""


def test_unreadable_permissions_are_a_recorded_reason(tmp_path):
    """chmod 000 stops every user but root: run the read as uid 65534 when we are root (tests run as root here)."""
    path = tmp_path / "secret.png"
    path.write_bytes(_encode(Image.fromarray(_good_rgb()), "PNG"))
    path.chmod(0)
    if os.geteuid() != 0:
        with pytest.raises(ImageError, match="permission denied"):
            decode_image(path)
        return
    os.chmod(tmp_path, 0o755)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    good = tmp_path / "good.png"
    good.write_bytes(path.read_bytes())
    argv = [sys.executable, "-c", _AS_NOBODY, str(path), str(good)]
    out = subprocess.run(argv, capture_output=True, text=True, env=env)
    if out.returncode != 0 and "Operation not permitted" in out.stderr:
        pytest.skip("cannot drop privileges to uid 65534 in this container")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:2] == ["permission denied", "permission denied"]
    assert decode_image(path).shape == (48, 48, 3)  # root reads it: the permission was the only problem


@pytest.mark.ray
@pytest.mark.slow
def test_score_writes_one_row_per_file_with_reasons(ray_session, corpus, tiny_artifact, tmp_path):
    """One scoring run over the whole corpus (Ray-heavy, so only one)."""
    from raydefect.config import load_config
    from raydefect.pipelines.score import run_score

    cfg = load_config("default", sets=["score.commit_interval_s=0", "score.batch_size=8"])
    out = tmp_path / "scores"
    report = run_score(str(tiny_artifact), str(corpus), str(out), cfg)
    table = pq.read_table(out, columns=["path", "width", "height", "defect_score", "error"]).to_pylist()
    rows = {r["path"]: r for r in table}
    assert len(rows) == len(table) == len(EXPECTED) + 1 == report.listed  # once each, the link to .. not walked
    for name, (outcome, reason) in EXPECTED.items():
        row = rows[str(corpus / name)]
        if outcome == "ok":
            assert row["error"] is None and row["width"] == 48 and 0 <= row["defect_score"] <= 1, (name, row)
        else:
            assert row["error"] and reason in row["error"] and row["defect_score"] is None, (name, row)
    assert "not valid UTF-8" in rows[str(corpus / BAD_NAME_TEXT)]["error"]


def test_evaluate_records_files_broken_after_prepare(synth_dataset, tiny_artifact, tmp_path):
    """A prepared dataset whose files were damaged later: each bad one is an error row, the rest are evaluated."""
    import json

    from click.testing import CliRunner

    from raydefect.cli import cli

    root = tmp_path / "ds"
    shutil.copytree(synth_dataset.root, root)
    import pyarrow as pa

    table = pq.read_table(root / "manifest.parquet").to_pylist()
    test_rows = [r for r in table if r["split"] == "test"]
    defect = next(r for r in test_rows if r["mask"])
    normal = next(r for r in test_rows if not r["mask"])
    copies = tmp_path / "files"
    copies.mkdir()
    for r in (defect, normal):  # the dataset's files are shared (session fixture): point at copies and damage those
        for col in ("image", "mask"):
            if r[col]:
                dest = copies / f"{col}-{Path(r[col]).name}"
                shutil.copyfile(r[col], dest)
                r[col] = str(dest)
    data = Path(normal["image"]).read_bytes()
    Path(normal["image"]).write_bytes(data[: len(data) // 3])  # truncated after prepare
    Path(defect["mask"]).write_bytes(_encode(Image.new("L", (7, 5), 255), "PNG"))  # mask of the wrong size
    pq.write_table(
        pa.Table.from_pylist(table, schema=pq.read_schema(root / "manifest.parquet")), root / "manifest.parquet"
    )

    result = CliRunner().invoke(
        cli,
        [
            "evaluate",
            "--model",
            str(tiny_artifact),
            "--data",
            str(root),
            "--split",
            "test",
            "--out",
            str(tmp_path / "r"),
            "--local",
        ],
    )
    assert result.exit_code == 0, result.output
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    errors = {e["image"]: e["error"] for e in m["errors"]}
    assert "truncated" in errors[normal["image"]]
    assert "mask" in errors[defect["image"]] and "7x5" in errors[defect["image"]]
    assert m["data"]["errors"] == 2 and m["data"]["images"] == len(test_rows)
