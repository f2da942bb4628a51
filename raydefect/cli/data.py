"""`raydefect synth` and `raydefect prepare`: synthetic images and raw folders -> a dataset."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from raydefect.cli.app import build_config, cli, config_options

if TYPE_CHECKING:
    from raydefect.data.prepare import PrepareReport


def _parse_size(_ctx: click.Context, _param: click.Parameter, value: str) -> tuple[int, int]:
    """``64`` or ``64x48`` (width x height)."""
    try:
        parts = [int(v) for v in value.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 8:
        raise click.BadParameter(f"{value!r}: expected a side like 64 or WIDTHxHEIGHT like 64x48 (each >= 8)")
    return parts[0], parts[1]


def _csv_list(_ctx: click.Context, _param: click.Parameter, value: str | None) -> tuple[str, ...] | None:
    return None if value is None else tuple(v.strip() for v in value.split(",") if v.strip())


@cli.command("synth")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--per-class", default=50, show_default=True, type=click.IntRange(0), help="Defect images per class.")
@click.option("--normal", default=200, show_default=True, type=click.IntRange(0), help="Normal images.")
@click.option("--size", default="64", show_default=True, callback=_parse_size, help="Side, or WIDTHxHEIGHT.")
@click.option("--seed", default=0, show_default=True, type=int, help="Same seed, byte-identical files.")
@click.option(
    "--classes",
    default="scratch,spot,crack,missing_piece",
    show_default=True,
    callback=_csv_list,
    help="Defect classes, comma-separated.",
)
@click.option(
    "--textures",
    default="brushed_metal,weave,noise,gradient",
    show_default=True,
    callback=_csv_list,
    help="Background textures to draw from, comma-separated.",
)
@click.option(
    "--color",
    type=click.Choice(["gray", "rgb", "mixed"]),
    default="mixed",
    show_default=True,
    help="Grayscale, RGB, or a mix of both.",
)
@click.option("--mask-suffix", default="", help="Appended to mask file stems, e.g. _mask.")
@click.option(
    "--defect-size",
    type=click.IntRange(8),
    default=None,
    help="Draw each defect as on an image of this side, placed anywhere: small defects in camera-size images "
    "(--size 1600x1200 --defect-size 128: scratches and cracks 2-6 px wide). Default: the image's own size.",
)
@click.option(
    "--archive",
    "archive_n",
    default=0,
    show_default=True,
    type=click.IntRange(0),
    help="Also write OUT/archive/ with this many unlabelled files for scoring (3 of them corrupt).",
)
@click.option(
    "--archive-brightness",
    default=0.0,
    show_default=True,
    type=click.FloatRange(-1, 1),
    help="Shift the archive's brightness by this fraction of full scale (a night under other light, for drift); "
    "--textures makes a texture shift.",
)
@click.option("--overwrite", is_flag=True, help="Replace what an earlier synth wrote in OUT.")
@click.option("--workers", type=click.IntRange(1), default=None, help="Processes for big jobs [default: all cores].")
def synth_cmd(
    out: str,
    per_class: int,
    normal: int,
    size: tuple[int, int],
    seed: int,
    classes: tuple[str, ...],
    textures: tuple[str, ...],
    color: str,
    mask_suffix: str,
    defect_size: int | None,
    archive_n: int,
    archive_brightness: float,
    overwrite: bool,
    workers: int | None,
) -> None:
    """Write synthetic defect images with exact masks to OUT (the raw layout `prepare` reads).

    \b
    OUT/defect_images/<class>/<class>_00000.png   defect images
    OUT/defect_masks/<class>/<class>_00000.png    their masks (0/255)
    OUT/normal_images/normal_00000.png            normal images
    OUT/archive/line_k/day_dd/img_000000.png|jpg  with --archive: unlabelled files, a few corrupt
    """
    from pathlib import Path

    from raydefect import console
    from raydefect.data.synth import generate_archive, generate_raw

    raw = generate_raw(
        out,
        per_class,
        normal,
        size,
        seed,
        classes,
        color,
        textures,
        mask_suffix,
        overwrite=overwrite,
        workers=workers,
        defect_size=defect_size,
    )
    console.result(
        f"wrote {console.count(raw['images'], 'image')} ({per_class} per class x {len(classes)} classes + "
        f"{normal} normal, "
        f"{size[0]}x{size[1]}) to {out} in {raw['seconds']:.1f} s"
    )
    console.info(
        f"prepare them with: raydefect prepare --defect-images {raw['defect_images']} "
        f"--defect-masks {raw['defect_masks']} --normal-images {raw['normal_images']} --out DATASET_DIR"
    )
    if archive_n:
        arc = generate_archive(
            Path(out) / "archive",
            archive_n,
            size,
            seed,
            classes=classes,
            color=color,
            textures=textures,
            n_corrupt=min(3, archive_n),
            overwrite=overwrite,
            workers=workers,
            defect_size=defect_size,
            brightness=archive_brightness,
        )
        console.result(
            f"wrote an archive of {console.count(arc['files'], 'file')} ({arc['corrupt']} corrupt) to {arc['out']}; "
            f"truth in {arc['truth_csv']}"
        )


@cli.command("prepare")
@config_options
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Dataset folder to write.")
@click.option("--defect-images", type=click.Path(), help="Classic layout: defect images (class = first sub-folder).")
@click.option("--defect-masks", type=click.Path(), help="Classic layout: their masks, matched by stem (+ _mask).")
@click.option("--normal-images", type=click.Path(), help="Classic layout: normal images.")
@click.option("--mvtec", type=click.Path(), help="MVTec AD: one category folder (train/, test/, ground_truth/).")
@click.option(
    "--images",
    multiple=True,
    metavar="GLOB",
    help="Generic layout: a quoted glob of images (** recurses; repeatable).",
)
@click.option(
    "--mask-template",
    metavar="TEMPLATE",
    help="Generic layout: the mask path from the image's {parent} {parent_name} {stem} {name} {suffix} {class}, "
    "e.g. '{parent}/{stem}.png'. Without --class-regex a missing or empty mask means normal.",
)
@click.option(
    "--class-regex", metavar="RE", help="Generic layout: the class from the path (named group 'class' or group 1)."
)
@click.option("--normal-class", metavar="NAME", help="Generic layout: the class (from --class-regex) of normal images.")
@click.option(
    "--mask-format",
    type=click.Choice(["binary", "index"]),
    default="binary",
    show_default=True,
    help="binary: defect = value >= 128. index: pixel value = class id, 0 = background (palette PNGs by index); "
    "the image's class is the class with the largest area.",
)
@click.option(
    "--class-names",
    metavar="A,B,C|FILE",
    help="Names of class ids 1, 2, ... (index masks, --rle-csv): a,b,c or a YAML map file ('1: scratch').",
)
@click.option("--coco", type=click.Path(), help="COCO JSON layout (CVAT, Label Studio): polygons and RLE.")
@click.option("--rle-csv", type=click.Path(), help="Run-length CSV layout (Severstal: ImageId,ClassId,EncodedPixels).")
@click.option(
    "--image-dir", type=click.Path(), help="With --coco/--rle-csv: the images' folder [default: the file's folder]."
)
@click.option("--split", "split_text", default="0.8,0.1,0.1", show_default=True, help="train,val,test fractions.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the split.")
@click.option(
    "--copy", is_flag=True, help="Copy images and binarised masks into --out (self-contained, relative paths)."
)
@click.option(
    "--strict",
    is_flag=True,
    help="Fail (exit 1, no manifest) on any problem with an image or mask (ignored stray files do not count).",
)
@click.option("--max-pixels", type=click.IntRange(1), default=None, help="Skip larger images [data.max_image_pixels].")
@click.option("--header-only", is_flag=True, help="Read image headers only, not pixels (faster; misses truncation).")
@click.option(
    "--workers",
    type=click.IntRange(1),
    default=None,
    help="Scan workers: forked processes from 1,000 images, else threads [default: one per core].",
)
@click.option(
    "--reviewed",
    multiple=True,
    type=click.Path(file_okay=False),
    metavar="DIR",
    help="Add a checked review set (`raydefect review --out DIR`, labels.csv) to the dataset; without a layout "
    "option the images of the dataset already in --out are kept (repeatable).",
)
def prepare_cmd(
    config_name: str,
    sets: tuple[str, ...],
    out: str,
    defect_images: str | None,
    defect_masks: str | None,
    normal_images: str | None,
    mvtec: str | None,
    images: tuple[str, ...],
    mask_template: str | None,
    class_regex: str | None,
    normal_class: str | None,
    mask_format: str,
    class_names: str | None,
    coco: str | None,
    rle_csv: str | None,
    image_dir: str | None,
    split_text: str,
    seed: int,
    copy: bool,
    strict: bool,
    max_pixels: int | None,
    header_only: bool,
    workers: int | None,
    reviewed: tuple[str, ...],
) -> None:
    """Check raw folders and write a dataset: manifest.parquet, dataset.yaml and problems.csv in --out.

    \b
    Layouts (one per run):
      classic  --defect-images DIR --defect-masks DIR --normal-images DIR
      MVTec AD --mvtec DIR/bottle
      generic  --images 'GLOB' --mask-template TEMPLATE [--class-regex RE --normal-class NAME]
      COCO     --coco annotations.json [--image-dir DIR]
      RLE CSV  --rle-csv train.csv --image-dir train_images [--class-names a,b,c]
    Class-index masks: add --mask-format index [--class-names a,b,c] to the classic or generic layout.
    \b
    The magnetic tile data set, for example:
      raydefect prepare --images 'magnetic_tile/MT_*/Imgs/*.jpg' --mask-template '{parent}/{stem}.png' \\
          --class-regex 'MT_(\\w+)/' --normal-class Free --out data/magnetic_tile

    Bad items (unreadable, missing or mis-sized mask, too large, duplicate) are skipped and listed in
    problems.csv; soft masks are binarised at 128 and empty masks in a defect class are kept and flagged.
    Re-running into the same --out keeps every old image in its split. --reviewed DIR adds the labels a person
    checked in a review set (`raydefect review`): new images join the splits by the same rules.
    """
    from raydefect.data.prepare import prepare_dataset, prepare_listing
    from raydefect.data.splits import parse_split

    cfg = build_config(config_name, sets, **{"data.max_image_pixels": max_pixels})
    fractions = parse_split(split_text)
    listing = prepare_listing(
        out,
        reviewed,
        coco=coco,
        rle_csv=rle_csv,
        image_dir=image_dir,
        mask_format=mask_format,
        class_names=class_names,
        defect_images=defect_images,
        defect_masks=defect_masks,
        normal_images=normal_images,
        mvtec=mvtec,
        images=images,
        mask_template=mask_template,
        class_regex=class_regex,
        normal_class=normal_class,
    )
    report = prepare_dataset(
        listing,
        out,
        split=fractions,
        seed=seed,
        copy=copy,
        strict=strict,
        max_pixels=cfg.data.max_image_pixels,
        verify_pixels=not header_only,
        workers=workers,
    )
    _show_prepare_report(report)


def _show_prepare_report(report: PrepareReport) -> None:
    from raydefect import console

    console.result(console.table(report.count_rows(), ["class", "train", "val", "test", "total"]))
    if report.problems:
        console.result("")
        console.result(console.table(report.problem_rows(), ["problem", "action", "files"]))
    console.result("")
    if report.kept_previous:
        console.info(f"kept the split of {console.count(report.kept_previous, 'image')} from the previous manifest")
    console.result(
        f"{console.count(report.images, 'image')}, "
        f"{console.count(len(report.classes) - 1, 'defect class', 'defect classes')}, "
        f"{console.count(len(report.problems), 'problem')} "
        f"in {report.seconds:.1f} s"
    )
    console.result(f"dataset:  {report.manifest}")
    console.result(f"summary:  {report.dataset_yaml}")
    console.result(f"problems: {report.problems_csv}")
