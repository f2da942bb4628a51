"""`raydefect score` (nightly bulk scoring) and `raydefect scores summarize|extract` (reading the results)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from raydefect.cli.app import RaydefectGroup, State, build_config, cli, config_options

if TYPE_CHECKING:
    from raydefect.config import Config


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
    "--threshold",
    type=click.FloatRange(0, 1),
    default=None,
    help="Image threshold for this run instead of the model's; the Parquet footer records it [score.threshold].",
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
    threshold: float | None,
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
    cfg = build_config(
        config_name,
        sets,
        **{
            "score.batch_size": batch_size,
            "score.model_actors": actors,
            "score.rows_per_file": rows_per_file,
            "score.engine": engine,
            "score.threshold": threshold,
        },
    )
    if json_path and not submit:
        from raydefect.paths import check_report_file

        check_report_file(json_path, "--json", out)
    if submit:
        _submit(state.address, model, input_, out, cfg, rescore, retry_errors, dry_run, json_path, env_names)
    elif dry_run:
        _dry_run(state.address, model, input_, out, cfg, rescore, json_path)
    else:
        _score(state.address, model, input_, out, cfg, rescore, retry_errors, json_path)


def _submit(
    address: str | None,
    model: str,
    input_: str,
    out: str,
    cfg: Config,
    rescore: bool,
    retry_errors: bool,
    dry_run: bool,
    json_path: str | None,
    env_names: tuple[str, ...],
) -> None:
    """``--submit``: the same command as a Ray job on the cluster at ``--address``."""
    from raydefect import console
    from raydefect.pipelines.submit import submit_score

    job_id = submit_score(
        address,
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
    console.result(f"submitted job {job_id} to {address}")
    console.info(f"follow it with: ray job logs --address {address} --follow {job_id}")


def _dry_run(
    address: str | None, model: str, input_: str, out: str, cfg: Config, rescore: bool, json_path: str | None
) -> None:
    """``--dry-run``: list what a run would score now."""
    from raydefect import console
    from raydefect.pipelines.score import list_pending

    if json_path:
        console.warn(f"--json {json_path}: a dry run scores nothing and writes no summary")

    pending = list_pending(model, input_, out, cfg, rescore=rescore, address=address)
    for path in pending.column("path").to_pylist()[:20]:
        console.info(path)
    more = pending.num_rows - 20
    if more > 0:
        console.info(f"... and {more:,} more")
    console.result(f"{pending.num_rows:,} image(s) would be scored into {out}")


def _score(
    address: str | None,
    model: str,
    input_: str,
    out: str,
    cfg: Config,
    rescore: bool,
    retry_errors: bool,
    json_path: str | None,
) -> None:
    """The run itself, its summary, and ``--json``."""
    import json

    from raydefect import console
    from raydefect.pipelines.score import run_score

    report = run_score(model, input_, out, cfg, rescore=rescore, retry_errors=retry_errors, address=address)
    for line in report.summary_lines():
        console.result(line)
    if json_path:
        from raydefect.paths import write_text_atomic

        write_text_atomic(json_path, json.dumps(report.to_dict(), indent=1, default=str))


@cli.group("scores", cls=RaydefectGroup)
def scores_group() -> None:
    """Read a scores folder: summarize it, report trends and drift (`scores report`), or write chosen masks and
    overlays as PNGs."""


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
    "width, height, size, mtime_ns, sha1, model_id, run_id, node_id, scored_at, brightness, contrast.",
)
@click.option("--paths", multiple=True, metavar="PATH", help="These images (repeatable).")
@click.option("--model", "model", metavar="ID", default=None, help=_MODEL_HELP)
def scores_extract_cmd(
    scores_dir: str, dest: str, top: int | None, where: tuple[str, ...], paths: tuple[str, ...], model: str | None
) -> None:
    """Write chosen masks (0/255 PNG at the image's size; class ids in the class colours for a per-pixel class model)
    and overlays on the original images, with index.csv.

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
