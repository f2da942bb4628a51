"""One self-contained HTML page for an evaluation: opens in any browser, offline, mailable as a single file.

Every picture is embedded as a base64 ``data:image/png`` URI and the style sheet is inline; no script, no web font,
no external link. The page holds, in order: what was evaluated (model, data, thresholds), the headline metrics at the
stored thresholds next to the best thresholds of this split, notes, the plots, the per-class table, the galleries of
the worst mistakes with captions, and the images that could not be read.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from raydefect.console import format_number
from raydefect.viz.overlay import class_colour, hex_colour

#: (key, title, what it shows) of every gallery, in report order.
GALLERIES = (
    ("false_negatives", "Worst false negatives", "defect images called normal, lowest defect score first"),
    ("false_positives", "Worst false positives", "normal images called defects, highest defect score first"),
    ("wrong_class", "Wrong defect class", "defects found but given another defect class, most confident first"),
    ("worst_iou", "Worst masks", "defects found with the right class, lowest IoU of predicted and true mask first"),
)

PAGE_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 0;
       color: #1d1d1f; background: #f5f5f7; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 34px 0 10px; border-bottom: 1px solid #d2d2d7; padding-bottom: 4px; }
h3 { font-size: 15px; margin: 20px 0 2px; }
p.sub, p.what { color: #555; margin: 2px 0 10px; font-size: 14px; }
table { border-collapse: collapse; background: #fff; font-size: 14px; }
th, td { padding: 5px 12px; border-bottom: 1px solid #e5e5ea; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #e8eef6; }
td.group { background: #f2f2f7; font-weight: 600; text-align: left; }
.facts td { text-align: left; }
.notes { background: #fff8e1; border: 1px solid #f0d98c; padding: 8px 14px; border-radius: 6px; font-size: 14px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(480px, 1fr)); gap: 16px; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(360px, 1fr)); gap: 14px; }
figure { margin: 0; background: #fff; border: 1px solid #e5e5ea; border-radius: 6px; padding: 8px; }
figure img { width: 100%; height: auto; display: block; image-rendering: auto; }
figcaption { font-size: 13px; color: #333; margin-top: 6px; line-height: 1.45; overflow-wrap: anywhere; }
.swatch { display: inline-block; width: 10px; height: 10px; border: 1px solid #888; margin-right: 5px; }
.empty { color: #777; font-style: italic; font-size: 14px; }
.good { color: #1b7f3b; } .bad { color: #b3261e; }
footer { margin-top: 40px; color: #777; font-size: 12px; }
"""

#: plot file key -> caption, in page order
PLOTS = (
    ("pr_curve", "Precision-recall (image level). The dot is the stored threshold."),
    ("roc_curve", "ROC (image level). The dot is the stored threshold."),
    ("confusion_matrix", "Confusion matrix at the stored threshold: rows are the true class."),
    ("iou_histogram", "Per-image IoU at the stored pixel threshold (a normal image with an empty mask scores 1)."),
    ("pixel_roc_curve", "ROC over all pixels."),
    ("pro_curve", "Per-region overlap: every defect region counts the same, however small."),
)


def data_uri(path: str | Path) -> str:
    """A PNG file as ``data:image/png;base64,...``."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def html_table(head: Sequence[str] | None, rows: Sequence[Sequence[Any]], cls: str = "") -> str:
    """A table; ``head=None`` for a key-value table without a header row."""
    out = [f'<table class="{cls}">']
    if head is not None:
        out.append("<thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr></thead>")
    out.append("<tbody>")
    width = len(head) if head is not None else max(len(r) for r in rows)
    for row in rows:
        if len(row) == 1:  # a group heading spanning the table
            out.append(f'<tr><td class="group" colspan="{width}">{_e(row[0])}</td></tr>')
        else:
            out.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def headline_rows(metrics: dict[str, Any]) -> list[list[str]]:
    """[metric, at the stored threshold, at the best threshold of this split] (HTML-escaped cells)."""
    image, pixel = metrics["image"], metrics["pixel"]
    at, best = image["at_threshold"], image["at_best"]
    best_thr = image["best_threshold"]
    rows: list[list[str]] = [["Image level: is the part defective?"]]
    rows.append(["threshold (defect score &ge;)", format_number(at["threshold"]), format_number(best_thr["value"])])
    for key in ("accuracy", "precision", "recall", "f1"):
        rows.append([key if key != "f1" else "F1", format_number(at[key]), format_number(best[key])])
    counts = [f"{op['fp']:,} / {op['fn']:,}" for op in (at, best)]
    rows.append(["false positives / false negatives", *counts])
    rows.append(["AUROC (threshold-free)", format_number(image["auroc"]), ""])
    rows.append(["AP (threshold-free)", format_number(image["ap"]), ""])
    rows.append(["class accuracy (right class, normal included)", format_number(image["class_accuracy"]), ""])
    pat, pbest = pixel["at_threshold"], pixel["at_best"]
    rows.append(["Pixel level: where is the defect?"])
    rows.append(
        [
            "threshold (mask probability &ge;)",
            format_number(pat["threshold"]),
            format_number(pixel["best_threshold"]["value"]),
        ]
    )
    rows.append(["mean IoU, defect images", format_number(pat["iou"]), format_number(pbest["iou"])])
    rows.append(["mean Dice, defect images", format_number(pat["dice"]), format_number(pbest["dice"])])
    rows.append(["mean IoU, all images", format_number(pat["iou_all"]), format_number(pbest["iou_all"])])
    rows.append(["mean Dice, all images", format_number(pat["dice_all"]), format_number(pbest["dice_all"])])
    rows.append(["pixel precision / recall", f"{format_number(pat['precision'])} / {format_number(pat['recall'])}", ""])
    rows.append(["pixel AUROC (threshold-free)", format_number(pixel["pixel_auroc"]), ""])
    rows.append([f"AUPRO up to FPR {pixel['fpr_limit']:g} (threshold-free)", format_number(pixel["aupro"]), ""])
    return rows  # labels are fixed HTML written above; values are numbers


def _per_class(metrics: dict[str, Any]) -> str:
    names = metrics["image"]["class_names"]
    head = ["class", "images", "predicted as", "correct", "precision", "recall", "F1", "mean defect score", "mean IoU"]
    rows = []
    for i, r in enumerate(metrics["per_class"]):
        swatch = f'<span class="swatch" style="background:{hex_colour(class_colour(i))}"></span>'
        rows.append(
            [
                swatch + _e(r["class"]),
                format_number(r["images"]),
                format_number(r["predicted"]),
                format_number(r["correct"]),
                format_number(r["precision"]),
                format_number(r["recall"]),
                format_number(r["f1"]),
                format_number(r["mean_defect_score"]),
                format_number(r["mean_iou"]),
            ]
        )
    note = (
        '<p class="what">Recall of a class is its share of images given that class; precision is the share of images '
        "given that class that really are. For <em>normal</em>, mean IoU is 1 when no mask is predicted.</p>"
    )
    return note + html_table(head, rows) if names else '<p class="empty">no classes</p>'


def _gallery(entries: Sequence[dict[str, Any]], out_dir: Path) -> str:
    if not entries:
        return '<p class="empty">none: no image of this kind in the split</p>'
    figures = []
    for g in entries:
        iou = "" if g.get("iou") is None else f" &middot; IoU {format_number(g['iou'])}"
        if g.get("note") and "mask empty" in g["note"]:
            iou = f" &middot; {_e(g['note'])}"
        figures.append(
            f'<figure><img src="{data_uri(out_dir / g["png"])}" alt="{_e(g["file"])}" title="{_e(g["image"])}">'
            f"<figcaption><b>{_e(g['file'])}</b><br>defect score {format_number(g['defect_score'])} &middot; "
            f"true <b>{_e(g['true_class'])}</b> &rarr; predicted <b>{_e(g['predicted_class'])}</b>{iou}"
            "</figcaption></figure>"
        )
    return '<div class="gallery">' + "".join(figures) + "</div>"


def _recall_table(rows: Sequence[dict[str, Any]]) -> str:
    head = ["target recall", "image threshold", "recall", "precision", "false alarm rate", "defects missed"]
    return html_table(
        head,
        [
            [format_number(r["target_recall"]), format_number(r["threshold"]), format_number(r["recall"]),
             format_number(r["precision"]), format_number(r["false_alarm_rate"]), format_number(r["defects_missed"])]
            for r in rows
        ],
    )  # fmt: skip


def _thresholds(story: dict[str, Any], out_dir: Path, plots: dict[str, str]) -> str:
    """The threshold story: how each was chosen, the score histogram, the image thresholds for target recalls."""
    parts = [
        "<h2>Thresholds</h2>",
        html_table(
            ["threshold", "value", "how it was chosen"],
            [
                ["image (defect score)", format_number(story["image"]), _e(story["how"]["image"])],
                ["pixel (mask probability)", format_number(story["pixel"]), _e(story["how"]["pixel"])],
            ],
        ),
    ]
    if story.get("derived_from"):
        parts.append(f'<p class="what">Thresholds moved from model {_e(story["derived_from"])}.</p>')
    if "score_histogram" in plots:
        parts.append(
            f'<figure><img src="{data_uri(out_dir / plots["score_histogram"])}" alt="score histogram">'
            "<figcaption>Defect scores of normal and defect images: the solid line is the stored image threshold, "
            "dotted lines the thresholds for the target recalls below.</figcaption></figure>"
        )
    if story.get("validation_at_recall"):
        parts.append("<h3>Image thresholds for target recalls, on the validation images</h3>")
        parts.append(_recall_table(story["validation_at_recall"]))
    parts.append("<h3>Image thresholds for target recalls, on this split</h3>")
    parts.append(
        '<p class="what">To use one: <code>raydefect thresholds MODEL --image-recall 0.99</code> writes the model '
        "with that threshold (chosen on its validation images); <code>raydefect score --threshold VALUE</code> "
        "uses a value for one run.</p>"
    )
    parts.append(_recall_table(story["at_recall"]))
    return "\n".join(parts)


def render_report(metrics: dict[str, Any], out_dir: str | Path) -> str:
    """The report page for `metrics` (metrics.json content, with "files" and "galleries"); images read from out_dir."""
    out_dir = Path(out_dir)
    model, data, image = metrics["model"], metrics["data"], metrics["image"]
    title = f"Evaluation of model {model['model_id']} on the {data['split']} split"
    facts = [
        ["model", f"{_e(model['model_id'])} &middot; {_e(model['backbone'])} &middot; {model['image_size']} px input"],
        ["model folder", _e(model["path"])],
        ["dataset", f"{_e(data['path'])} &middot; split <b>{_e(data['split'])}</b>"],
        [
            "images",
            f"{data['evaluated']:,} evaluated ({image['n_defect']:,} defect, {image['n_normal']:,} normal)"
            + (f", <span class='bad'>{data['errors']:,} unreadable</span>" if data["errors"] else ""),
        ],
        [
            "stored thresholds",
            f"image {format_number(model['thresholds']['image'])} &middot; "
            f"pixel {format_number(model['thresholds']['pixel'])}",
        ],
        [
            "evaluated",
            f"{_e(metrics['created_at'])} with raydefect {_e(metrics['raydefect_version'])} "
            f"({_e(metrics['engine'])}, {metrics['seconds']:.1f} s)",
        ],
    ]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{PAGE_CSS}</style></head><body><main>",
        f"<h1>{_e(title)}</h1>",
        '<p class="sub">raydefect evaluate: every number uses the thresholds stored in the model, unless marked as '
        "the best threshold of this split (what the split would have chosen; optimistic).</p>",
        html_table(None, facts, "facts"),
        "<h2>Headline metrics</h2>",
        html_table(
            ["metric", "at the stored threshold", "at the best threshold of this split"], headline_rows(metrics)
        ),
    ]
    if metrics.get("notes"):
        parts.append('<h2>Notes</h2><div class="notes"><ul>')
        parts += [f"<li>{_e(n)}</li>" for n in metrics["notes"]]
        parts.append("</ul></div>")
    plots = metrics.get("files", {}).get("plots", {})
    parts.append('<h2>Curves and plots</h2><div class="grid">')
    for key, caption in PLOTS:
        if key in plots:
            parts.append(
                f'<figure><img src="{data_uri(out_dir / plots[key])}" alt="{_e(key)}">'
                f"<figcaption>{_e(caption)}</figcaption></figure>"
            )
    parts.append("</div>")
    if metrics.get("thresholds"):
        parts.append(_thresholds(metrics["thresholds"], out_dir, plots))
    parts.append("<h2>Per class</h2>" + _per_class(metrics))
    galleries = metrics.get("galleries", {})
    parts.append(
        "<h2>Worst mistakes</h2>"
        '<p class="what">Left: the image with the true mask outlined in white. Right: the prediction, filled in the '
        "colour of the predicted class. Green means the image was called normal.</p>"
    )
    if not galleries:
        parts.append('<p class="empty">not drawn (evaluate --gallery 0)</p>')
    for key, heading, what in GALLERIES:
        if key not in galleries:
            continue
        parts.append(f"<h3>{_e(heading)} ({len(galleries[key])})</h3><p class='what'>{_e(what)}</p>")
        parts.append(_gallery(galleries[key], out_dir))
    errors = metrics.get("errors", [])
    if errors:
        shown = errors[:200]
        parts.append(f"<h2>Unreadable images ({len(errors):,})</h2>")
        parts.append(html_table(["image", "error"], [[_e(e["image"]), _e(e["error"])] for e in shown]))
        if len(errors) > len(shown):
            parts.append(f'<p class="empty">and {len(errors) - len(shown):,} more in metrics.json</p>')
    parts.append(
        "<footer>Files next to this page: metrics.json (every number), per_image.csv (one row per image), the plots "
        "and gallery/ as PNG.</footer></main></body></html>"
    )
    return "\n".join(parts)


def write_report(path: str | Path, metrics: dict[str, Any], out_dir: str | Path) -> Path:
    path = Path(path)
    path.write_text(render_report(metrics, out_dir), encoding="utf-8")
    return path
