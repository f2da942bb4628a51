"""For people: `raydefect predict`, `evaluate` and `export` (they call raydefect.tasks / pipelines.evaluate)."""

from __future__ import annotations

import click

from raydefect.cli.app import State, cli

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
    from raydefect.tasks.predict import predict_images

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
        f"{console.count(summary.images, 'image')} in {summary.seconds:.1f} s "
        f"({summary.images_per_second:.1f} images/s): "
        f"{console.count(summary.defects, 'defect')} ({found}), {summary.errors:,} unreadable"
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
        f"{console.count(data_info['evaluated'], 'image')} of the {split!r} split "
        f"({data_info['errors']:,} unreadable) at thresholds "
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
    from raydefect.tasks.export import export_model

    report = export_model(
        model, out, fmt, opset=opset, batch=batch, check=check, tolerance=tolerance, legacy=legacy_exporter
    )
    if report.checked:
        rows = [
            {"batch": b.replace("batch_", ""), **{k: f"{v:.2e}" for k, v in d.items()}}
            for b, d in report.parity.items()
            if b != "class_ids"
        ]
        console.result("largest absolute difference to PyTorch:")
        console.result(console.table(rows))
        ids = report.parity.get("class_ids")
        if ids:  # a model.mask_classes model: the class ids compared too
            console.result(f"pixel class ids: {ids['differing']} of {ids['pixels']} pixels differ (each at a tie)")
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
