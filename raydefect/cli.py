"""The `raydefect` command line: parse, load config, call one pipeline function.

Thin by design. Heavy modules (torch, ray, timm, pyarrow) are imported inside each command so that
``raydefect --help`` is instant. User errors (`RaydefectError`) print one line and exit 1; Click usage errors
exit 2.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click

from raydefect import __version__


@dataclass
class State:
    """Global options shared by every command."""

    address: str | None = None
    verbosity: int = 0


class RaydefectGroup(click.Group):
    """Turns user errors into one line on stderr and exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        from raydefect.errors import RaydefectError, Terminated

        try:
            return super().invoke(ctx)
        except RaydefectError as e:
            message = " ".join(str(e).split())  # one line, whatever the message holds
            click.echo(f"error: {message}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt as e:
            terminated = isinstance(e, Terminated)  # SIGTERM during `score`: 128 + 15, as the shell's
            click.echo("terminated" if terminated else "interrupted", err=True)
            ctx.exit(143 if terminated else 130)


@click.group(cls=RaydefectGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, "--version", prog_name="raydefect")
@click.option(
    "--address",
    envvar="RAY_ADDRESS",
    default=None,
    metavar="ADDR",
    help="Ray cluster: 'auto' or 'host:port' on a cluster node (also RAY_ADDRESS); 'http://head:8265' for "
    "`score --submit`. Default: an embedded local Ray, started only by commands that need it.",
)
@click.option("-v", "--verbose", count=True, help="More output (repeat for more; shows Ray's own logs).")
@click.option("-q", "--quiet", count=True, help="Less output: errors and final results only.")
@click.pass_context
def cli(ctx: click.Context, address: str | None, verbose: int, quiet: int) -> None:
    """raydefect: find defects in inspection images at dataset scale, on Ray.

    \b
    Typical flow:
      raydefect prepare ...        raw folders  -> dataset (manifest.parquet)
      raydefect tune ...           dataset      -> study with the best config
      raydefect train --best ...   best config  -> model artifact (runs/<name>/model/)
      raydefect score ...          archive      -> Parquet of scores and masks
      raydefect predict/evaluate/export ...     -> overlays, a report, ONNX / TorchScript
    """
    from raydefect import console

    state = State(address=address, verbosity=verbose - quiet)
    console.set_verbosity(state.verbosity)
    from raydefect.pipelines.cluster import resolve_address, send_known_token

    if resolve_address(address):  # an existing cluster or its Jobs API
        send_known_token()  # now: Ray reads RAY_AUTH_MODE once, when it is imported
    ctx.obj = state


def config_options(func: Callable) -> Callable:
    """``--config`` and repeatable ``--set`` for commands that build a `Config`."""

    @click.option(
        "--config",
        "config_name",
        default="default",
        show_default=True,
        metavar="NAME|FILE",
        help="A shipped config name (see `raydefect config --list`) or a YAML file.",
    )
    @click.option(
        "--set",
        "sets",
        multiple=True,
        metavar="SECTION.KEY=VALUE",
        help="Override one config value (repeatable), e.g. --set optim.lr=3e-4.",
    )
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return func(*args, **kwargs)

    return wrapper


def build_config(config_name: str, sets: tuple[str, ...], **options: Any):
    """Load the config: file <- explicit options (dotted keys; None = not given) <- --set."""
    from raydefect.config import load_config

    return load_config(config_name, options=options, sets=sets)


@cli.command("config")
@config_options
@click.option("--list", "list_", is_flag=True, help="List the shipped config files.")
def config_cmd(config_name: str, sets: tuple[str, ...], list_: bool) -> None:
    """Show the resolved config, each key with its documentation."""
    from raydefect.config import describe, shipped_configs

    if list_:
        for name, path in sorted(shipped_configs().items()):
            click.echo(f"{name:12s} {path}")
        return
    click.echo(describe(build_config(config_name, sets)), nl=False)


@cli.command("models")
@config_options
@click.option(
    "--classes",
    type=click.IntRange(min=2),
    default=2,
    show_default=True,
    help="Classes the heads are sized for: normal + defect classes.",
)
@click.option("--exact", is_flag=True, help="Exact parameter counts instead of 21.6M-style.")
def models_cmd(config_name: str, sets: tuple[str, ...], classes: int, exact: bool) -> None:
    """List every backbone with its parameter counts (registry data: nothing is built or downloaded).

    \b
    Counts: the backbone, the classification head, the segmentation head and the total, for heads sized by the
    config (model.decoder_dim, model.head_hidden, model.feature_blocks) at each backbone's default image size
    (the size its weights were made for; set data.image_size to a multiple of the patch size, for CNNs of 32).
    Kind: vit (DINOv3 / DINOv2, best with pretrained weights) or cnn (timm ResNet / ConvNeXt / EfficientNet,
    which also learn from your labels alone with --config scratch).
    Use a name, its torch-hub name or its timm name as model.backbone.
    """
    from raydefect.console import table
    from raydefect.models.sizes import format_count, parameter_table

    cfg = build_config(config_name, sets)
    rows = parameter_table(cfg.model, num_classes=classes)
    if not exact:
        for row in rows:
            for key in ("backbone params", "cls head", "seg head", "total"):
                row[key] = format_count(row[key])
    click.echo(table(rows))


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
        f"wrote {raw['images']:,} images ({per_class} per class x {len(classes)} classes + {normal} normal, "
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
        )
        console.result(
            f"wrote an archive of {arc['files']:,} files ({arc['corrupt']} corrupt) to {arc['out']}; "
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
    split_text: str,
    seed: int,
    copy: bool,
    strict: bool,
    max_pixels: int | None,
    header_only: bool,
    workers: int | None,
) -> None:
    """Check raw folders and write a dataset: manifest.parquet, dataset.yaml and problems.csv in --out.

    \b
    Layouts (one per run):
      classic  --defect-images DIR --defect-masks DIR --normal-images DIR
      MVTec AD --mvtec DIR/bottle
      generic  --images 'GLOB' --mask-template TEMPLATE [--class-regex RE --normal-class NAME]
    \b
    The magnetic tile data set, for example:
      raydefect prepare --images 'magnetic_tile/MT_*/Imgs/*.jpg' --mask-template '{parent}/{stem}.png' \\
          --class-regex 'MT_(\\w+)/' --normal-class Free --out data/magnetic_tile

    Bad items (unreadable, missing or mis-sized mask, too large, duplicate) are skipped and listed in
    problems.csv; soft masks are binarised at 128 and empty masks in a defect class are kept and flagged.
    Re-running into the same --out keeps every old image in its split.
    """
    from raydefect import console
    from raydefect.data.importers import listing_from_options
    from raydefect.data.prepare import prepare_dataset
    from raydefect.data.splits import parse_split

    cfg = build_config(config_name, sets, **{"data.max_image_pixels": max_pixels})
    fractions = parse_split(split_text)
    listing = listing_from_options(
        defect_images, defect_masks, normal_images, mvtec, images, mask_template, class_regex, normal_class
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
    console.result(console.table(report.count_rows(), ["class", "train", "val", "test", "total"]))
    if report.problems:
        console.result("")
        console.result(console.table(report.problem_rows(), ["problem", "action", "files"]))
    console.result("")
    if report.kept_previous:
        console.info(f"kept the split of {report.kept_previous:,} images from the previous manifest")
    console.result(
        f"{report.images:,} images, {len(report.classes) - 1} defect classes, {len(report.problems):,} problems "
        f"in {report.seconds:.1f} s"
    )
    console.result(f"dataset:  {report.manifest}")
    console.result(f"summary:  {report.dataset_yaml}")
    console.result(f"problems: {report.problems_csv}")


# --- for people: predict, evaluate, export (issue 6) ---------------------------------------------------------------

_MODEL_HELP = "Model artifact folder (runs/<name>/model, or the run folder holding it)."


@cli.command("predict")
@click.option("--model", "model", required=True, type=click.Path(), help=_MODEL_HELP)
@click.option(
    "--images",
    required=True,
    multiple=True,
    metavar="DIR|GLOB|FILE",
    help="A folder (searched recursively), a quoted glob ('**' recurses) or an image file; repeatable.",
)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for scores.csv and overlays/.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1), help="Images per model batch.")
@click.option(
    "--threshold",
    type=click.FloatRange(0, 1),
    default=None,
    help="Image threshold on the defect score [default: the model's stored one].",
)
@click.option(
    "--pixel-threshold",
    type=click.FloatRange(0, 1),
    default=None,
    help="Mask probability threshold [default: the model's stored one].",
)
@click.option("--no-overlays", is_flag=True, help="Only write scores.csv (faster).")
@click.option("--device", default="auto", show_default=True, help="'auto' (CUDA when present), 'cpu' or 'cuda[:N]'.")
@click.option(
    "--workers", type=click.IntRange(1), default=None, help="Decode/overlay threads [default: cores/2, 1 to 4]."
)
def predict_cmd(
    model: str,
    images: tuple[str, ...],
    out: str,
    batch_size: int,
    threshold: float | None,
    pixel_threshold: float | None,
    no_overlays: bool,
    device: str,
    workers: int | None,
) -> None:
    """Score a folder of images on this machine (no cluster): overlays for people and a CSV for tools.

    \b
    OUT/scores.csv             path, width, height, defect_score, is_defect, defect_class, p_<class> per class,
                               mask_area_px, mask_fraction, bbox (x0 y0 x1 y1, exclusive), overlay, error
    OUT/overlays/<name>.png    the image beside the image with the predicted mask filled and outlined,
                               class and defect score written on it (sub-folders kept)

    An unreadable image gets a row with its error; the others are scored.
    """
    from raydefect import console
    from raydefect.predict import predict_images

    summary = predict_images(
        model,
        list(images),
        out,
        batch_size=batch_size,
        threshold=threshold,
        pixel_threshold=pixel_threshold,
        overlays=not no_overlays,
        device=device,
        workers=workers,
    )
    found = ", ".join(f"{n:,} {c}" for c, n in summary.per_class.items() if n and c != "normal") or "none"
    console.result(
        f"{summary.images:,} images in {summary.seconds:.1f} s ({summary.images_per_second:.1f} images/s): "
        f"{summary.defects:,} defects ({found}), {summary.errors:,} unreadable"
    )
    console.result(f"scores:   {summary.scores_csv}")
    if summary.overlay_dir is not None:
        console.result(f"overlays: {summary.overlay_dir}")


@cli.command("evaluate")
@click.option("--model", "model", required=True, type=click.Path(), help=_MODEL_HELP)
@click.option("--data", required=True, type=click.Path(), help="Dataset folder written by `raydefect prepare`.")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "val", "test"]))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the report and its files.")
@click.option(
    "--ray/--local",
    "use_ray",
    default=None,
    help="Force Ray Data (an actor pool, on --address or an embedded Ray) or the local loop "
    "[default: Ray above --ray-above images].",
)
@click.option("--ray-above", default=2000, show_default=True, type=click.IntRange(0), help="Split size that uses Ray.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1), help="Images per model batch.")
@click.option(
    "--actors", type=click.IntRange(1), default=None, help="Model actors on Ray [default: 1 per GPU, else CPUs/2]."
)
@click.option("--gallery", default=8, show_default=True, type=click.IntRange(0), help="Images per gallery (0: none).")
@click.option("--device", default="auto", show_default=True, help="Local path: 'auto', 'cpu' or 'cuda[:N]'.")
@click.pass_obj
def evaluate_cmd(
    state: State,
    model: str,
    data: str,
    split: str,
    out: str,
    use_ray: bool | None,
    ray_above: int,
    batch_size: int,
    actors: int | None,
    gallery: int,
    device: str,
) -> None:
    """Measure a model on a labelled split with its STORED thresholds and write a report for people.

    \b
    OUT/report.html        one self-contained page (every image embedded): open it in any browser
    OUT/metrics.json       every number: image level (accuracy, precision, recall, F1 at the stored and at the
                           best threshold, AUROC, AP, confusion matrix), pixel level (IoU, Dice, pixel AUROC,
                           AUPRO), per class, notes, unreadable images
    OUT/per_image.csv      one row per image: scores, decision, IoU and Dice
    OUT/*.png              PR and ROC curves, confusion matrix, IoU histogram, pixel ROC, PRO curve
    OUT/gallery/<kind>/    the worst false negatives, false positives, wrong classes and masks, as overlays
    """
    import os
    import time

    from raydefect import console
    from raydefect.pipelines.evaluate import evaluate

    start = time.perf_counter()
    evaluation = evaluate(
        model,
        data,
        out,
        split=split,
        use_ray=use_ray,
        ray_above=ray_above,
        address=state.address,
        batch_size=batch_size,
        actors=actors,
        device=device,
        gallery_size=gallery,
    )
    h = evaluation.metrics["headline"]
    rows = [
        {"level": "image", "metric": k, "value": h[k]} for k in ("accuracy", "precision", "recall", "f1", "auroc", "ap")
    ] + [{"level": "pixel", "metric": k, "value": h[k]} for k in ("iou", "dice", "pixel_auroc", "aupro")]
    for row in rows:
        row["value"] = "n/a" if row["value"] is None else f"{row['value']:.4f}"
    console.result(console.table(rows, ["level", "metric", "value"]))
    for note in evaluation.metrics["notes"]:
        console.warn(note)
    data_info = evaluation.metrics["data"]
    console.result(
        f"{data_info['evaluated']:,} images of the {split!r} split ({data_info['errors']:,} unreadable) at thresholds "
        f"image {h['image_threshold']:.3g} / pixel {h['pixel_threshold']:.3g} in {time.perf_counter() - start:.1f} s"
    )
    console.result(f"report:  {os.path.join(out, 'report.html')}")
    console.result(f"metrics: {os.path.join(out, 'metrics.json')}")


@cli.command("export")
@click.option("--model", "model", required=True, type=click.Path(), help=_MODEL_HELP)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["onnx", "torchscript"]),
    default=None,
    help="[default: from --out: .onnx -> onnx, .pt/.ts -> torchscript]",
)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="File to write; FILE.json describes it.")
@click.option("--opset", type=click.IntRange(7), default=None, help="ONNX opset [default: the exporter's].")
@click.option("--batch", default=2, show_default=True, type=click.IntRange(1), help="Example batch used for tracing.")
@click.option(
    "--check/--no-check",
    default=None,
    help="Compare outputs with PyTorch at batch 1 and --batch + 1. Default: when possible (ONNX needs onnxruntime; "
    "without it the file is written unchecked, with a warning); --check fails instead.",
)
@click.option(
    "--tolerance",
    default=1e-4,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="Largest absolute difference allowed per output.",
)
@click.option("--legacy-exporter", is_flag=True, help="ONNX: torch.onnx's TorchScript-based exporter (dynamo=False).")
def export_cmd(
    model: str,
    fmt: str | None,
    out: str,
    opset: int | None,
    batch: int,
    check: bool | None,
    tolerance: float,
    legacy_exporter: bool,
) -> None:
    """Export a model to ONNX or TorchScript with a dynamic batch size, checked against PyTorch.

    \b
    input   image         float32 [N, 3, S, S]  RGB, resized whole to S x S, (x/255 - mean) / std
    outputs defect_score  [N]; class_probs [N, C]; mask_prob [N, S, S]
    OUT.json              the preprocessing contract (size, mean/std), class names, thresholds, output
                          names, decision rule and the parity figures

    A file whose outputs differ from PyTorch by more than --tolerance is removed and the command fails.
    """
    from raydefect import console
    from raydefect.export import export_model

    report = export_model(
        model, out, fmt, opset=opset, batch=batch, check=check, tolerance=tolerance, legacy=legacy_exporter
    )
    if report.checked:
        rows = [
            {"batch": b.replace("batch_", ""), **{k: f"{v:.2e}" for k, v in d.items()}}
            for b, d in report.parity.items()
        ]
        console.result("largest absolute difference to PyTorch:")
        console.result(console.table(rows))
        console.result(f"parity within {tolerance:g}")
    else:
        console.result(f"parity NOT checked: {report.reason_unchecked}")
    console.result(
        f"wrote {report.path} ({report.size_bytes / 1e6:.1f} MB, {report.format}, dynamic batch) in "
        f"{report.seconds:.1f} s"
    )
    for extra in report.extra_files:
        console.result(f"weights: {extra} (keep it beside {report.path.name})")
    console.result(f"contract: {report.sidecar}")


# --- training (issue 3) ------------------------------------------------------------------------------------------


def _parse_epochs(_ctx: click.Context, _param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    """``8`` (total, spread over the stages) or ``2,2,4`` (per stage)."""
    if value is None:
        return None
    try:
        parts = tuple(int(v) for v in value.split(","))
    except ValueError:
        parts = ()
    if len(parts) not in (1, 3) or min(parts) < 0 or sum(parts) < 1:
        raise click.BadParameter(f"{value!r}: expected a total like 8 or per-stage epochs like 2,2,4")
    return parts


def train_config(
    ctx: click.Context,
    config_name: str,
    sets: tuple[str, ...],
    options: dict[str, Any],
    epochs: tuple[int, ...] | None = None,
    freeze_backbone: bool = False,
):
    """The config of a training: a re-used --name starts from that run's saved config.yaml (so the same command,
    or just --name, resumes it) unless --config is given; then explicit options, --epochs / --freeze-backbone,
    and --set."""
    from pathlib import Path

    from raydefect.engine.run import CONFIG_FILE
    from raydefect.engine.schedule import split_epochs

    cfg = build_config(config_name, sets, **options)
    explicit_config = ctx.get_parameter_source("config_name") is not click.core.ParameterSource.DEFAULT
    if cfg.train.name and not explicit_config:
        saved = Path(cfg.train.runs_dir).expanduser() / cfg.train.name / CONFIG_FILE
        if saved.is_file():
            config_name = str(saved)
            cfg = build_config(config_name, sets, **options)
    if epochs is None and not freeze_backbone:
        return cfg
    sched = cfg.schedule
    if freeze_backbone and not (cfg.model.pretrained or cfg.model.weights):
        from raydefect.errors import ConfigError

        raise ConfigError(
            f"--freeze-backbone: the backbone {cfg.model.backbone} is random-init (model.pretrained=false, no "
            "model.weights): freezing it would train the heads on noise. Drop --freeze-backbone to train it whole, "
            "or load weights (model.pretrained=true or model.weights=PATH)"
        )
    if freeze_backbone:
        total = epochs[0] if epochs and len(epochs) == 1 else (sched.frozen_epochs or sched.total_epochs)
        if epochs and len(epochs) == 3:
            raise click.BadParameter("with --freeze-backbone give one number of epochs", param_hint="--epochs")
        stages = (total, 0, 0)
    elif epochs is not None and len(epochs) == 3:
        stages = epochs
    else:
        stages = split_epochs(epochs[0], sched)  # type: ignore[index]
    keys = ("schedule.frozen_epochs", "schedule.partial_epochs", "schedule.full_epochs")
    return build_config(config_name, sets, **options, **dict(zip(keys, stages, strict=True)))


@cli.command("train")
@config_options
@click.option("--data", type=click.Path(), help="Prepared dataset folder (`raydefect prepare --out`).")
@click.option("--name", help="Run name: output in <runs_dir>/<name>/; re-using a name resumes that run.")
@click.option("--backbone", help="Backbone from `raydefect models`, e.g. dinov3-s, dinov3-b, dinov2-s.")
@click.option(
    "--epochs",
    callback=_parse_epochs,
    metavar="N|A,B,C",
    help="Total epochs (spread over the three stages as configured) or epochs per stage: frozen,partial,full.",
)
@click.option("--freeze-backbone", is_flag=True, help="Stage 1 only: train the heads on a frozen backbone.")
@click.option("--num-workers", type=click.IntRange(1), help="Data-parallel Ray Train workers [resources.num_workers].")
@click.option(
    "--gpus-per-worker",
    type=click.FloatRange(0, min_open=True),
    help="GPUs per worker when the cluster has GPUs [resources.gpus_per_worker].",
)
@click.option(
    "--cpus-per-worker",
    type=click.FloatRange(0, min_open=True),
    help="CPUs per worker; on CPU-only machines also torch's threads [resources.cpus_per_worker].",
)
@click.option("--batch-size", type=click.IntRange(1), help="Images per batch per worker [train.batch_size].")
@click.option("--lr", type=float, help="Peak backbone learning rate [optim.lr].")
@click.option("--image-size", type=click.IntRange(16), help="Side the model sees, a multiple of the patch size.")
@click.option(
    "--best",
    "best",
    is_flag=False,
    flag_value="",
    default=None,
    metavar="[STUDY]",
    help="Train the best config of a `raydefect tune` study at full fidelity: a study name or folder; alone, the "
    "latest study under train.runs_dir. Options and --set still apply on top.",
)
@click.pass_context
def train_cmd(
    ctx: click.Context,
    config_name: str,
    sets: tuple[str, ...],
    data: str | None,
    name: str | None,
    backbone: str | None,
    epochs: tuple[int, ...] | None,
    freeze_backbone: bool,
    num_workers: int | None,
    gpus_per_worker: float | None,
    cpus_per_worker: float | None,
    batch_size: int | None,
    lr: float | None,
    image_size: int | None,
    best: str | None,
) -> None:
    """Fine-tune a defect model on a prepared dataset with Ray Train; write runs/<name>/ and its model/.

    \b
    Stages: 1 frozen backbone (heads only), 2 last blocks unfrozen, 3 full fine-tune (schedule.* epochs).
    Output: config.yaml, metrics.csv, plots/, checkpoints, model/ (thresholds chosen on val), test_metrics.json.
    Re-running the same --name resumes from its last checkpoint; --address runs it on a Ray cluster.
    --best [STUDY] trains a tune study's best.yaml (run <study>-best, the latest study when none is named).
    """
    from pathlib import Path

    from raydefect import console
    from raydefect.pipelines.train import train

    options = {
        "data.dataset": str(Path(data).expanduser().absolute()) if data else None,
        "train.name": name,
        "model.backbone": backbone,
        "resources.num_workers": num_workers,
        "resources.gpus_per_worker": gpus_per_worker,
        "resources.cpus_per_worker": cpus_per_worker,
        "train.batch_size": batch_size,
        "optim.lr": lr,
        "data.image_size": image_size,
    }
    if best is not None:
        if ctx.get_parameter_source("config_name") is not click.core.ParameterSource.DEFAULT:
            raise click.UsageError("--best takes its config from the study's best.yaml; drop --config")
        from raydefect.config import load_config
        from raydefect.tuning.study import best_file, find_study

        runs_dir = load_config(config_name, sets=sets).train.runs_dir
        study = find_study(best or None, runs_dir)
        config_name = str(best_file(study))
        console.info(f"training the best config of study {study.name}: {config_name}")
    cfg = train_config(ctx, config_name, sets, options, epochs, freeze_backbone)
    result = train(cfg, address=ctx.obj.address)
    best = result.best_metrics
    metric = cfg.schedule.metric

    def f(value: Any) -> str:
        return "-" if value is None or value != value else f"{value:.3f}"

    console.result("")
    console.result(
        f"best epoch {result.best_epoch} of {len(result.history)}: {metric} {f(best.get(metric))} "
        f"(val_f1 {f(best.get('val_f1'))}, val_iou {f(best.get('val_iou'))}, val_dice {f(best.get('val_dice'))})"
        + ("; stopped early" if result.stopped_early else "")
    )
    export = result.export
    if export is not None:
        t = export.test_metrics
        if t:
            console.result(
                f"test: f1 {f(t.get('test_f1'))}  ap {f(t.get('test_ap'))}  auroc {f(t.get('test_auroc'))}  "
                f"iou {f(t.get('test_iou'))}  dice {f(t.get('test_dice'))}  at thresholds image "
                f"{export.thresholds['image']:.3g}, pixel {export.thresholds['pixel']:.3g}"
            )
        console.result(f"model:   {export.model_dir} (id {export.model_id})")
        if export.test_metrics_path is not None:
            console.result(f"test:    {export.test_metrics_path}")
    console.result(f"metrics: {result.run_dir / 'metrics.csv'} (plots in {result.run_dir / 'plots'})")


# --- tuning (issue 4) ----------------------------------------------------------------------------------------------


@cli.command("tune")
@config_options
@click.option("--data", type=click.Path(), help="Prepared dataset folder (`raydefect prepare --out`).")
@click.option("--name", help="Study name: output in <runs_dir>/tune-<name>/ [tune.name; default: dataset + time].")
@click.option("--space", metavar="NAME|FILE", help="Search space: shipped name or YAML file [tune.space].")
@click.option("--num-samples", type=click.IntRange(1), help="Number of trials [tune.num_samples].")
@click.option(
    "--time-budget",
    type=click.FloatRange(0, min_open=True),
    metavar="SECONDS",
    help="Stop the study after this long; running trials stop, finished ones count [tune.time_budget_s].",
)
@click.option("--metric", help="Validation metric trials are ranked by, e.g. val_score, val_f1 [tune.metric].")
@click.option("--mode", type=click.Choice(["max", "min"]), help="Whether a larger metric is better [tune.mode].")
@click.option(
    "--max-concurrent",
    type=click.IntRange(1),
    help="Trials at a time [tune.max_concurrent; default: what the cluster's GPUs/CPUs fit].",
)
@click.option("--resume", is_flag=True, help="Continue an interrupted study (--name NAME|PATH, or the latest one).")
@click.pass_context
def tune_cmd(
    ctx: click.Context,
    config_name: str,
    sets: tuple[str, ...],
    data: str | None,
    name: str | None,
    space: str | None,
    num_samples: int | None,
    time_budget: float | None,
    metric: str | None,
    mode: str | None,
    max_concurrent: int | None,
    resume: bool,
) -> None:
    """Search backbone, learning rate and more with Ray Tune + Optuna; write runs/tune-<name>/.

    \b
    Each trial fine-tunes with Ray Train on a cheaper setting (tune.subset of the training split, tune.image_size,
    tune.epochs); Optuna TPE proposes, ASHA stops weak trials early. Output: trials.csv, best.yaml (a complete
    training config at full fidelity), plots/. Then: raydefect train --best.
    """
    from pathlib import Path

    from raydefect.pipelines.tune import tune_study

    if resume:
        given = [
            flag
            for flag, value in (
                ("--config", ctx.get_parameter_source("config_name") is not click.core.ParameterSource.DEFAULT),
                ("--set", any(not item.startswith("train.runs_dir=") for item in sets)),
                ("--data", data),
                ("--space", space),
                ("--num-samples", num_samples),
                ("--time-budget", time_budget),
                ("--metric", metric),
                ("--mode", mode),
                ("--max-concurrent", max_concurrent),
            )
            if value
        ]
        if given:
            raise click.UsageError(
                f"--resume continues the study with the settings it was started with; drop {', '.join(given)} "
                "(or start a new study with another --name; --set train.runs_dir=DIR says where studies are)"
            )
        runs_dir = build_config("default", sets).train.runs_dir
        tune_study(None, resume=True, name=name, runs_dir=runs_dir, address=ctx.obj.address)
        return
    options = {
        "data.dataset": str(Path(data).expanduser().absolute()) if data else None,
        "tune.name": name,
        "tune.space": space,
        "tune.num_samples": num_samples,
        "tune.time_budget_s": time_budget,
        "tune.metric": metric,
        "tune.mode": mode,
        "tune.max_concurrent": max_concurrent,
    }
    cfg = build_config(config_name, sets, **options)
    tune_study(cfg, address=ctx.obj.address)


# --- scoring (issue 5) ---------------------------------------------------------------------------------------------


@cli.command("score")
@config_options
@click.option("--model", required=True, metavar="MODEL_DIR", help="Model artifact folder (runs/<name>/model) or URI.")
@click.option(
    "--input",
    "input_",
    required=True,
    metavar="DIR|GLOB|MANIFEST",
    help="A folder (recursive, by score.extensions), a quoted glob, or a .txt/.csv/.parquet list of paths; "
    "local or s3:// / gs://.",
)
@click.option("--out", required=True, metavar="OUT", help="Scores folder (local, s3:// or gs://); created if missing.")
@click.option("--rescore", is_flag=True, help="Score every image again, even those this model already scored.")
@click.option("--retry-errors", is_flag=True, help="Score again images whose last row has an error.")
@click.option("--batch-size", type=click.IntRange(1), default=None, help="Images per model batch [score.batch_size].")
@click.option("--actors", type=click.IntRange(1), default=None, help="Model replicas [score.model_actors].")
@click.option(
    "--engine",
    type=click.Choice(["auto", "torch", "onnx"]),
    default=None,
    help="Model runtime: torch, onnx (ONNX Runtime on CPU) or auto (onnx on CPU when installed) [score.engine].",
)
@click.option(
    "--rows-per-file", type=click.IntRange(1), default=None, help="Most rows per Parquet file [score.rows_per_file]."
)
@click.option(
    "--submit",
    is_flag=True,
    help="Submit the run to the cluster's Jobs API (--address http://head:8265) and print the job id. Local paths "
    "are sent absolute and must exist on the head node; --dry-run and --json are passed on to the job.",
)
@click.option(
    "--env",
    "env_names",
    multiple=True,
    metavar="NAME",
    help="With --submit: copy this environment variable into the job's runtime_env (by name; repeatable).",
)
@click.option("--dry-run", is_flag=True, help="Only list the images a run would score now (new or changed).")
@click.option(
    "--json", "json_path", type=click.Path(dir_okay=False), help="Also write the run summary as JSON (not inside OUT)."
)
@click.pass_obj
def score_cmd(
    state: State,
    config_name: str,
    sets: tuple[str, ...],
    model: str,
    input_: str,
    out: str,
    rescore: bool,
    retry_errors: bool,
    batch_size: int | None,
    actors: int | None,
    engine: str | None,
    rows_per_file: int | None,
    submit: bool,
    env_names: tuple[str, ...],
    dry_run: bool,
    json_path: str | None,
) -> None:
    """Score an archive of images into Parquet: one row per image with scores, class and mask (PNG).

    \b
    Nightly and incremental: only new or changed images are scored (score.incremental_key: stat = path + size +
    mtime, hash = content); a new model scores everything again. A killed run, started again, ends with exactly
    one row per image. Read the results with `raydefect scores summarize OUT`, pandas, pyarrow or DuckDB:
      SELECT path, defect_score FROM read_parquet('OUT/*/*/*.parquet') ORDER BY defect_score DESC
    """
    import json

    from raydefect import console

    cfg = build_config(
        config_name,
        sets,
        **{
            "score.batch_size": batch_size,
            "score.model_actors": actors,
            "score.rows_per_file": rows_per_file,
            "score.engine": engine,
        },
    )
    if json_path and not submit:
        from raydefect.paths import check_report_file

        check_report_file(json_path, "--json", out)
    if submit:
        from raydefect.pipelines.submit import submit_score

        job_id = submit_score(
            state.address,
            model,
            input_,
            out,
            cfg,
            rescore=rescore,
            retry_errors=retry_errors,
            dry_run=dry_run,
            json_path=json_path,
            env_names=env_names,
        )
        console.result(f"submitted job {job_id} to {state.address}")
        console.info(f"follow it with: ray job logs --address {state.address} --follow {job_id}")
        return
    if dry_run:
        from raydefect.pipelines.score import list_pending

        if json_path:
            console.warn(f"--json {json_path}: a dry run scores nothing and writes no summary")

        pending = list_pending(model, input_, out, cfg, rescore=rescore, address=state.address)
        for path in pending.column("path").to_pylist()[:20]:
            console.info(path)
        more = pending.num_rows - 20
        if more > 0:
            console.info(f"... and {more:,} more")
        console.result(f"{pending.num_rows:,} image(s) would be scored into {out}")
        return
    from raydefect.pipelines.score import run_score

    report = run_score(model, input_, out, cfg, rescore=rescore, retry_errors=retry_errors, address=state.address)
    for line in report.summary_lines():
        console.result(line)
    if json_path:
        from raydefect.paths import write_text_atomic

        write_text_atomic(json_path, json.dumps(report.to_dict(), indent=1, default=str))


@cli.group("scores", cls=RaydefectGroup)
def scores_group() -> None:
    """Read a scores folder: summarize it, or write chosen masks and overlays as PNGs."""


_MODEL_HELP = (
    "The model whose scores to read: its id (or a unique prefix). Default: the model of the newest run (a folder "
    "scored by several models holds every image once per model)."
)


@scores_group.command("summarize")
@click.argument("out", metavar="OUT")
@click.option("--top", default=10, show_default=True, type=click.IntRange(0), help="Top-scoring images to list.")
@click.option("--folders", default=20, show_default=True, type=click.IntRange(0), help="Folders to list (0: all).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON instead of tables.")
@click.option("--model", "model", metavar="ID", default=None, help=_MODEL_HELP)
def scores_summarize_cmd(out: str, top: int, folders: int, as_json: bool, model: str | None) -> None:
    """Counts, the defect rate per run and per folder, and the top-scoring images (newest row per image) of one
    model; the runs table lists every run."""
    import json

    from raydefect import console
    from raydefect.scoring.results import summarize

    s = summarize(out, top=top, folders=folders, model=model)
    if as_json:
        click.echo(json.dumps(s, indent=1, default=str))
        return
    others = len(s["models"]) - 1
    console.result(
        f"{s['out']}: {s['images']:,} images, {s['defects']:,} defects ({100 * s['defect_rate']:.1f}% of scored), "
        f"{s['errors']:,} errors; model {s['model'] or '-'}"
        + (f" (the newest of {others + 1}; --model for another)" if others and model is None else "")
        + f"; {len(s['runs'])} run(s), {s['history_rows']:,} rows in all"
    )
    formats = {"defect %": ".1f", "mask %": ".2f", "defect_score": ".4f"}
    console.result("\nruns")
    console.result(console.table(s["runs"], formats=formats))
    console.result(f"\nfolders ({len(s['folders'])} of {s['folders_total']})")
    console.result(console.table(s["folders"], formats=formats))
    if top:
        console.result("\ntop-scoring images")
        console.result(console.table(s["top"], formats=formats))


@scores_group.command("extract")
@click.argument("scores_dir", metavar="OUT")
@click.option("--out", "dest", required=True, type=click.Path(file_okay=False), help="Folder for the PNGs.")
@click.option("--top", type=click.IntRange(1), default=None, help="The N highest defect scores (after filters).")
@click.option(
    "--where",
    multiple=True,
    metavar="EXPR",
    help="Filter COLUMN OP VALUE, e.g. 'defect_class=crack' or 'defect_score>=0.9' (repeatable, all must hold). "
    "OP: = == != > >= < <=. COLUMN: path, defect_score, is_defect, defect_class, mask_fraction, mask_area_px, "
    "width, height, size, mtime_ns, sha1, model_id, run_id, node_id, scored_at.",
)
@click.option("--paths", multiple=True, metavar="PATH", help="These images (repeatable).")
@click.option("--model", "model", metavar="ID", default=None, help=_MODEL_HELP)
def scores_extract_cmd(
    scores_dir: str, dest: str, top: int | None, where: tuple[str, ...], paths: tuple[str, ...], model: str | None
) -> None:
    """Write chosen masks (0/255 PNG at the image's size) and overlays on the original images, with index.csv.

    Without --top, --where or --paths: the 20 highest-scoring images.
    """
    from raydefect import console
    from raydefect.scoring.results import extract

    if top is None and not where and not paths:
        top = 20
    r = extract(scores_dir, dest, top=top, where=where, paths=paths, model=model)
    if r["removed"]:
        console.info(f"removed the {r['removed']} PNG(s) of the previous extract into {dest} (its index.csv)")
    console.result(f"wrote {r['masks']} mask(s) and {r['overlays']} overlay(s) to {dest}; index: {r['index']}")
    for p, why in r["missing"]:
        console.warn(f"{p}: {why}")
    if r["no_overlay"]:
        first = r["no_overlay"][0]
        console.warn(
            f"{len(r['no_overlay'])} overlay(s) not drawn (the original image unreadable or changed since scoring), "
            f"e.g. {first['path']}: {first['note']}; see the note column of index.csv"
        )
    if not r["masks"] and where:
        console.warn(f"no scored image matched {' and '.join(where)} (rows with an error are never extracted)")


def main() -> None:
    cli(prog_name="raydefect")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
