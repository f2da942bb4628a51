"""The morning page of `raydefect scores report`: one self-contained HTML file (inline SVG charts, no script).

It shows, in order: the verdict on the newest run (alarm, warning or fine, with the reasons), the runs with their
defect rate, class mix, errors and drift (PSI per quantity against the model's validation distribution), the
newest night's distributions against that reference, and the defect rate per folder level.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

from raydefect.viz.report import PAGE_CSS, html_table

_NIGHT = "#d9531e"
_REF = "#1f4e79"
_LEVEL_CLASS = {"ok": "good", "warn": "warn", "alarm": "bad", "n/a": "empty"}
_EXTRA_CSS = ".warn { color: #a15c00; } .verdict { font-size: 17px; font-weight: 600; } svg { background: #fff; }"


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _psi_cell(d: dict[str, Any]) -> str:
    if d["psi"] is None:
        return f'<span class="empty" title="{_e(d["note"])}">{_e(d["note"].split(" (")[0])}</span>'
    return f'<span class="{_LEVEL_CLASS[d["level"]]}">{d["psi"]:.3f} {_e(d["level"])}</span>'


def _bars(values: Sequence[float | None], labels: Sequence[str], title: str, width: int = 720) -> str:
    """A bar chart of fractions (defect rate per run)."""
    h, pad = 160, 30
    top = max([v for v in values if v is not None] + [1e-9])
    n = max(len(values), 1)
    bw = (width - 2 * pad) / n
    parts = [f'<svg width="{width}" height="{h + 40}" role="img"><title>{_e(title)}</title>']
    for i, (v, label) in enumerate(zip(values, labels, strict=True)):
        x = pad + i * bw
        bh = 0 if v is None else h * v / top
        parts.append(
            f'<rect x="{x + 1:.1f}" y="{h - bh + 10:.1f}" width="{max(bw - 2, 1):.1f}" height="{bh:.1f}" '
            f'fill="{_NIGHT if i == n - 1 else _REF}"><title>{_e(label)}: {_pct(v)}</title></rect>'
        )
    parts.append(f'<text x="{pad}" y="{h + 30}" font-size="12">{_e(labels[0] if labels else "")}</text>')
    parts.append(
        f'<text x="{width - pad}" y="{h + 30}" font-size="12" text-anchor="end">{_e(labels[-1] if labels else "")} '
        f"(max {_pct(top)})</text></svg>"
    )
    return "".join(parts)


def _histogram(night: Sequence[int], reference: Sequence[int] | None, lo: float, hi: float, title: str) -> str:
    """Two distributions on the same bins, as fractions: the night (orange) beside the reference (blue)."""
    w, h, pad = 440, 150, 28
    total = sum(night) or 1
    frac = [c / total for c in night]
    ref = [c / (sum(reference) or 1) for c in reference] if reference else None
    top = max(frac + (ref or []) + [1e-9])
    n = len(frac)
    bw = (w - 2 * pad) / n
    parts = [
        f'<svg width="{w}" height="{h + 45}" role="img"><title>{_e(title)}</title>',
        f'<text x="{pad}" y="14" font-size="13" font-weight="600">{_e(title)}</text>',
    ]
    for i in range(n):
        x = pad + i * bw
        for j, (series, colour) in enumerate(((ref, _REF), (frac, _NIGHT))):
            if series is None:
                continue
            bh = h * series[i] / top
            parts.append(
                f'<rect x="{x + j * bw / 2:.1f}" y="{h - bh + 20:.1f}" width="{max(bw / 2 - 1, 1):.1f}" '
                f'height="{bh:.1f}" fill="{colour}" opacity="0.85"/>'
            )
    parts.append(f'<text x="{pad}" y="{h + 36}" font-size="11">{lo:g}</text>')
    parts.append(f'<text x="{w - pad}" y="{h + 36}" font-size="11" text-anchor="end">{hi:g}</text></svg>')
    return "".join(parts)


def _verdict(report: dict[str, Any]) -> str:
    night = report["night"]
    reasons = night["drift_alarms"] + night["rate"]["reasons"]
    if night["alarm"]:
        head = f'<p class="verdict bad">ALARM on run {_e(night["run"])} (exit code 3)</p>'
    elif night["warnings"]:
        head = f'<p class="verdict warn">Warning on run {_e(night["run"])}</p>'
    else:
        head = f'<p class="verdict good">Run {_e(night["run"])}: no alarm</p>'
    items = "".join(f"<li>{_e(r)}</li>" for r in reasons + night["warnings"])
    return head + (f'<ul class="notes">{items}</ul>' if items else "")


_RUN_COLUMNS = [
    "run",
    "state",
    "images",
    "defects",
    "errors",
    "defect rate",
    "PSI score",
    "PSI brightness",
    "PSI contrast",
    "class mix",
    "errors by kind",
]


def _facts(report: dict[str, Any]) -> list[list[str]]:
    ref = report["reference"]
    return [
        ["scores", _e(report["out"])],
        ["model", _e(report["model"])],
        ["archive root", _e(report["root"] or "-")],
        ["rows", f"{report['images']:,} ({report['defects']:,} defects, {report['errors']:,} errors)"],
        ["defect rate", _pct(report["defect_rate"])],
        [
            "validation reference",
            f"{_e(ref['source'])}, {ref['images']:,} images, defect rate {_pct(ref['defect_rate'])}",
        ],
        [
            "drift thresholds",
            f"PSI less its sampling noise: warn {report['rules']['psi_warn']}, alarm {report['rules']['psi_alarm']}",
        ],
    ]


def _run_cells(r: dict[str, Any]) -> list[str]:
    classes = ", ".join(f"{k} {v:,}" for k, v in r["classes"].items()) or "-"
    errors = ", ".join(f"{k} {v:,}" for k, v in r["error_kinds"].items())
    return [
        _e(r["run"]),
        _e(r["state"]),
        f"{r['images']:,}",
        f"{r['defects']:,}",
        f"{r['errors']:,}",
        _pct(r["defect_rate"]),
        *(_psi_cell(r["drift"][q]) for q in ("defect_score", "brightness", "contrast")),
        _e(classes),
        _e(errors or "-"),
    ]


def _night_charts(report: dict[str, Any]) -> list[str]:
    """The newest run's histograms over the validation reference's."""
    night = report["runs"][-1]
    return [
        _histogram(
            night["histograms"][q],
            report["reference"]["histograms"].get(q),
            report["bins"][q][0],
            report["bins"][q][1],
            f"{q} (orange: run {night['run']}, blue: validation)",
        )
        for q in ("defect_score", "brightness", "contrast")
    ]


def _folder_sections(report: dict[str, Any]) -> list[str]:
    body = []
    for depth, rows in report["folders"].items():
        body.append(f"<h2>Defect rate per folder, level {_e(depth)}</h2>")
        body.append(
            html_table(
                ["folder", "images", "defects", "errors", "defect rate"],
                [
                    [
                        _e(r["folder"]),
                        f"{r['images']:,}",
                        f"{r['defects']:,}",
                        f"{r['errors']:,}",
                        _pct(r["defect_rate"]),
                    ]
                    for r in rows
                ],
            )
        )
    return body


def render_trends(report: dict[str, Any]) -> str:
    """report.json's content -> the HTML page."""
    facts = _facts(report)
    run_rows = [_run_cells(r) for r in report["runs"]]
    charts = _night_charts(report)
    body = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>raydefect scores report: {_e(report['out'])}</title>",
        f"<style>{PAGE_CSS}{_EXTRA_CSS}</style></head><body><main>",
        "<h1>Scores report</h1>",
        _verdict(report),
        html_table(None, facts, "facts"),
        "<h2>Runs</h2>",
        html_table(_RUN_COLUMNS, run_rows),
        "<h3>Defect rate per run</h3>",
        _bars([r["defect_rate"] for r in report["runs"]], [r["run"] for r in report["runs"]], "defect rate per run"),
        f"<h2>Newest run against the validation distribution</h2><div class='grid'>{''.join(charts)}</div>",
        *_folder_sections(report),
    ]
    body.append("<footer>raydefect scores report; the same figures are in report.json beside this page.</footer>")
    body.append("</main></body></html>")
    return "\n".join(body)
