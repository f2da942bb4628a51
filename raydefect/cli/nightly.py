"""The nightly loop's commands: `raydefect scores report` (trends, drift, alarms) and `raydefect review` (what a person
should label next)."""

from __future__ import annotations

import click

from raydefect.cli.app import cli
from raydefect.cli.score import scores_group

_MODEL_ID_HELP = "The model whose scores to read: its id (or a unique prefix). Default: the model of the newest run."


def _levels(_ctx: click.Context, _param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        levels = ()
    if not levels or min(levels) < 1:
        raise click.BadParameter(f"{value!r}: expected folder depths such as 1,2 (1 = the first folder under the root)")
    return levels


@scores_group.command("report")
@click.argument("scores_dir", metavar="OUT")
@click.option("--out", "dest", required=True, type=click.Path(file_okay=False), help="Folder for report.html/json.")
@click.option(
    "--levels",
    default="1,2",
    show_default=True,
    callback=_levels,
    help="Folder depths under the archive root to group by, e.g. 1,2 = line, then line/day.",
)
@click.option("--root", default=None, metavar="PREFIX", help="The archive root [default: the folder all paths share].")
@click.option(
    "--reference",
    "reference_model",
    default=None,
    metavar="MODEL_DIR",
    help="Model artifact whose validation distribution to compare with [default: the one the scores carry].",
)
@click.option("--psi-warn", default=0.1, show_default=True, type=click.FloatRange(0), help="PSI that warns.")
@click.option("--psi-alarm", default=0.25, show_default=True, type=click.FloatRange(0), help="PSI that alarms.")
@click.option(
    "--max-defect-rate",
    default=None,
    type=click.FloatRange(0, 1),
    help="Alarm when the newest run's defect rate is above this fraction [default: off].",
)
@click.option(
    "--rate-factor",
    default=2.0,
    show_default=True,
    type=click.FloatRange(1),
    help="Alarm when the newest run's defect rate is this many times the earlier runs' (and significant, z >= 3).",
)
@click.option(
    "--baseline-runs", default=7, show_default=True, type=click.IntRange(0), help="Earlier runs in the baseline."
)
@click.option("--model", "model", metavar="ID", default=None, help=_MODEL_ID_HELP)
def scores_report_cmd(
    scores_dir: str,
    dest: str,
    levels: tuple[int, ...],
    root: str | None,
    reference_model: str | None,
    psi_warn: float,
    psi_alarm: float,
    max_defect_rate: float | None,
    rate_factor: float,
    baseline_runs: int,
    model: str | None,
) -> None:
    """The morning report over every run of a scores folder: report.html and report.json in --out.

    \b
    Defect rate per run and per folder level, class mix, errors, and each run's defect scores, brightness and
    contrast against the model's validation distribution (PSI: 0.1 warns, 0.25 alarms). Exit code 3 when the
    newest run raises an alarm (drift, or a defect-rate jump), so cron or a Kubernetes job can alert; 0 otherwise.
    """
    from raydefect import console
    from raydefect.scoring.trends import EXIT_ALARM, AlarmRules, build_report, write_report

    if psi_alarm < psi_warn:
        raise click.BadParameter(f"--psi-alarm {psi_alarm} is below --psi-warn {psi_warn}", param_hint="--psi-alarm")
    reference = None
    if reference_model:
        from raydefect.models.artifact import read_artifact_meta

        reference = dict(read_artifact_meta(reference_model).reference)
        if not reference:
            console.warn(f"{reference_model}: the model holds no validation distribution (trained before it existed)")
    rules = AlarmRules(psi_warn, psi_alarm, max_defect_rate, rate_factor, baseline_runs)
    report = build_report(scores_dir, levels=levels, root=root, reference=reference, rules=rules, model=model)
    paths = write_report(report, dest)
    night = report["night"]
    console.result(
        f"{report['out']}: {len(report['runs'])} run(s), {report['images']:,} rows, defect rate "
        f"{100 * (report['defect_rate'] or 0):.1f}%; newest run {night['run']}"
    )
    for line in night["drift_alarms"] + night["rate"]["reasons"]:
        console.warn(f"ALARM: {line}")
    for line in night["warnings"]:
        console.warn(f"warning: {line}")
    console.result(f"report: {paths['html']} (summary: {paths['json']})")
    if night["alarm"]:
        raise SystemExit(EXIT_ALARM)


@cli.command("review")
@click.argument("scores_dir", metavar="OUT")
@click.option("--out", "dest", required=True, type=click.Path(file_okay=False), help="Folder for the review set.")
@click.option("--n", "n", default=200, show_default=True, type=click.IntRange(1), help="Images to pick in all.")
@click.option(
    "--mix",
    default="uncertain=0.4,disagree=0.3,novel=0.3",
    show_default=True,
    help="Share of --n per reason (unused shares pass to the others).",
)
@click.option(
    "--runs",
    "runs",
    default=1,
    show_default=True,
    type=click.IntRange(0),
    help="Pick from the newest N runs (0: every run).",
)
@click.option(
    "--reference",
    "reference_model",
    default=None,
    metavar="MODEL_DIR",
    help="Model artifact whose validation distribution defines 'novel' [default: the one the scores carry].",
)
@click.option("--model", "model", metavar="ID", default=None, help=_MODEL_ID_HELP)
def review_cmd(
    scores_dir: str, dest: str, n: int, mix: str, runs: int, reference_model: str | None, model: str | None
) -> None:
    """Pick the images a person should label next, with the predicted masks as pre-labels.

    \b
    Reasons: uncertain (defect score near the image threshold), disagree (the class head says defect and the mask
    is empty, or the reverse), novel (brightness and contrast far from the validation images). Within each reason
    the picks are spread over folders. Writes OUT/images/, OUT/masks/ (0/255 PNG), OUT/labels.csv (edit the class
    column, then `raydefect prepare --reviewed OUT`), and OUT/annotations/instances_default.json (COCO 1.0 with RLE
    masks: CVAT imports it as pre-labels).
    """
    from raydefect import console
    from raydefect.scoring.review import parse_mix, pick_review, write_review

    shares = parse_mix(mix)
    reference = None
    if reference_model:
        from raydefect.models.artifact import read_artifact_meta

        reference = dict(read_artifact_meta(reference_model).reference) or None
    picked = pick_review(scores_dir, n=n, shares=shares, runs=runs, reference=reference, model=model)
    result = write_review(scores_dir, picked, dest)
    if picked.note:
        console.info(picked.note)
    counts = ", ".join(f"{k} {v}" for k, v in result["reasons"].items()) or "none"
    console.result(f"picked {result['images']} image(s) for review ({counts}) into {dest}")
    for problem in result["problems"][:5]:
        console.warn(problem)
    if len(result["problems"]) > 5:
        console.warn(f"... and {len(result['problems']) - 5} more image(s) left out (unreadable now)")
    console.result(f"labels: {result['labels']}; CVAT (COCO 1.0): {result['coco']}")
