"""The study folder of `raydefect tune` (contract 4 of docs/architecture.md) and what is derived from it, without Ray.

    runs/tune-<name>/
      study.yaml        what the study was started with: base config, search space, planned epochs (for --resume)
      trials/<id>/      each trial's Ray Train run folder: config.yaml, metrics.csv, checkpoints, trial.json
      tune/             Ray Tune's own experiment folder (experiment state, searcher and scheduler state)
      trials.csv        one row per trial: params, metric (best and last), epochs run, status, error, duration
      best.yaml         a complete training config: the base config with the best trial's params, full fidelity
      plots/            optimisation history, parameter importance, metric vs learning rate per backbone

trials.csv is rebuilt from the trial folders (what every trial wrote itself) plus the trials' Tune status, so it
is complete after an interruption too. Multi-fidelity: a trial trains ``tune.subset`` of the training split at
``tune.image_size`` for ``tune.epochs`` epochs (the three stages scaled in proportion); best.yaml goes back to the
base config's data and schedule.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raydefect import __version__
from raydefect.config import SCHEMA_VERSION, Config, read_yaml
from raydefect.errors import ConfigError, OutputError, StudyError
from raydefect.paths import write_text_atomic

STUDY_FILE = "study.yaml"
TRIALS_CSV = "trials.csv"
BEST_FILE = "best.yaml"
TRIALS_DIR = "trials"
TUNE_DIR = "tune"
PLOTS_DIR = "plots"
TRIAL_FILE = "trial.json"
#: What the driver knows of a trial (params, start, error), for a trial that dies before it writes trial.json
DRIVER_FILE = "driver.json"
STATUS_FILE = "tune_status"
PREFIX = "tune-"

TERMINATED, STOPPED, ERROR, RUNNING, PENDING = "TERMINATED", "STOPPED-EARLY", "ERROR", "RUNNING", "PENDING"


def study_dir(runs_dir: str | Path, name: str) -> Path:
    return Path(runs_dir).expanduser().absolute() / f"{PREFIX}{name}"


def default_study_name(cfg: Config) -> str:
    data = Path(cfg.data.dataset).name if cfg.data.dataset else "study"
    return f"{data}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def check_name(name: str) -> str:
    if not name or "/" in name or name in (".", "..") or name.startswith("."):
        raise ConfigError(f"tune.name: must be a plain folder name, got {name!r}")
    return name


# ------------------------------------------------------------------------------------------------ configs
def fidelity_overrides(cfg: Config) -> dict[str, Any]:
    """The low-fidelity settings of a trial (tune.subset / image_size / epochs) plus what a trial needs: checkpoint
    ranking by the tuned metric, one kept checkpoint, no Ray Train retries (a NaN loss or OOM repeats)."""
    from raydefect.engine.schedule import split_epochs

    t = cfg.tune
    out: dict[str, Any] = {
        "data.subset": t.subset,
        "data.image_size": t.image_size or cfg.data.image_size,
        "schedule.metric": t.metric,
        "schedule.mode": t.mode,
        "train.keep_checkpoints": 1,
        "train.max_failures": 0,
    }
    if t.epochs is not None:
        stages = split_epochs(t.epochs, cfg.schedule)
        out.update(
            {
                "schedule.frozen_epochs": stages[0],
                "schedule.partial_epochs": stages[1],
                "schedule.full_epochs": stages[2],
            }
        )
    return out


def trial_config(base: Config, params: Mapping[str, Any]) -> Config:
    """The config one trial trains: the base with the trial's params, then the trial fidelity."""
    with_params = base.replace(**dict(params)) if params else base
    return with_params.replace(**fidelity_overrides(with_params))


def planned_epochs(base: Config, params: Mapping[str, Any]) -> int:
    return trial_config(base, params).schedule.total_epochs


def best_config(base: Config, params: Mapping[str, Any], name: str, runs_dir: str | Path | None = None) -> Config:
    """The full-fidelity training config of the winner: base config + params, named ``<study>-best``, its run next
    to the study (``runs_dir``: the study's runs folder)."""
    cfg = base.replace(**dict(params)) if params else base
    overrides: dict[str, Any] = {"train.name": f"{name}-best"}
    if runs_dir is not None:
        overrides["train.runs_dir"] = str(runs_dir)
    return cfg.replace(**overrides)


# -------------------------------------------------------------------------------------------- study.yaml
@dataclass
class Study:
    """A study folder and what it was started with."""

    root: Path
    name: str
    base: Config
    space: dict[str, Any]
    space_source: str
    created_at: str = ""

    @property
    def trials_dir(self) -> Path:
        return self.root / TRIALS_DIR

    @property
    def tune_dir(self) -> Path:
        return self.root / TUNE_DIR


def write_study(root: Path, name: str, base: Config, space: Mapping[str, Any], space_source: str) -> Study:
    root.mkdir(parents=True, exist_ok=True)
    data = {
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "created_at": dt.datetime.now().isoformat(timespec="seconds"),
        "raydefect": __version__,
        "space_source": space_source,
        "space": dict(space),
        "base": base.to_dict(),
    }
    try:
        (root / STUDY_FILE).write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    except OSError as e:
        raise OutputError(f"cannot write {root / STUDY_FILE}: {e.strerror}") from None
    return Study(root, name, base, dict(space), space_source, data["created_at"])


def read_study(root: str | Path) -> Study:
    root = Path(root)
    path = root / STUDY_FILE
    if not path.is_file():
        raise StudyError(f"{root} is not a study folder (no {STUDY_FILE}); start one with `raydefect tune --data ...`")
    data = read_yaml(path) or {}
    try:
        base = Config.from_dict(data["base"], source=str(path))
        return Study(
            root,
            str(data["name"]),
            base,
            dict(data["space"]),
            str(data.get("space_source", "")),
            str(data.get("created_at", "")),
        )
    except (KeyError, TypeError) as e:
        raise StudyError(f"{path} is damaged ({e}); start a new study with another --name") from None


def find_study(study: str | None, runs_dir: str | Path) -> Path:
    """A study folder from a name (``demo`` or ``tune-demo``) or a path; the latest under ``runs_dir`` (by the
    time its files last changed) when ``study`` is None."""
    runs = Path(runs_dir).expanduser().absolute()
    if study:
        candidates = [Path(study).expanduser(), runs / study, runs / f"{PREFIX}{study}"]
        for c in candidates:
            if (c / STUDY_FILE).is_file():
                return c.absolute()
        found = sorted(p.name.removeprefix(PREFIX) for p in _studies(runs))
        known = f"; studies in {runs}: {', '.join(found)}" if found else f"; {runs} holds no study"
        raise StudyError(f"no study '{study}' (looked for {candidates[0]} and {runs / (PREFIX + study)}){known}")
    studies = _studies(runs)
    if not studies:
        raise StudyError(
            f"no study under {runs}: run `raydefect tune --data DATASET` first, or name one (`--best PATH`, "
            "`--set train.runs_dir=DIR`)"
        )
    return max(studies, key=_last_change)


def _studies(runs: Path) -> list[Path]:
    if not runs.is_dir():
        return []
    return [p for p in runs.iterdir() if p.is_dir() and (p / STUDY_FILE).is_file()]


def _last_change(root: Path) -> float:
    files = [root / STUDY_FILE, root / TRIALS_CSV, root / BEST_FILE]
    return max(f.stat().st_mtime for f in files if f.exists())


def best_file(root: Path) -> Path:
    """best.yaml of a study, or a `StudyError` saying why there is none and what to do."""
    path = root / BEST_FILE
    if path.is_file():
        return path
    raise StudyError(
        f"study {root.name} has no finished trial, so no {BEST_FILE} (see {root / TRIALS_CSV}); continue it with "
        f"`raydefect tune --resume --name {root.name.removeprefix(PREFIX)}` or start a new one"
    )


# --------------------------------------------------------------------------------------- trial records
def write_trial_record(run_dir: Path, **fields: Any) -> None:
    """Merge ``fields`` into the trial's trial.json (written by the trial itself: params, start, end, error)."""
    path = run_dir / TRIAL_FILE
    record = read_trial_record(run_dir)
    record.update(fields)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(record, indent=1, default=str))


def write_driver_record(run_dir: Path, **fields: Any) -> None:
    """Merge ``fields`` into driver.json: the driver's own record of the trial (never trial.json, which the trial's
    process writes at the same time). `collect_trials` falls back on it, so a trial whose actor died before its
    function ran (a node lost, an import error on the cluster) is still a row of trials.csv."""
    path = run_dir / DRIVER_FILE
    record = _read_json(path)
    record.update(fields)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(record, indent=1, default=str))


def write_tune_status(run_dir: Path, status: str) -> None:
    """The trial's status as Ray Tune last reported it (written by the driver, read by `collect_trials`)."""
    write_text_atomic(run_dir / STATUS_FILE, status + "\n")


def read_tune_status(run_dir: Path) -> str:
    try:
        return (run_dir / STATUS_FILE).read_text(encoding="utf-8").strip()
    except OSError:
        return ""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def read_trial_record(run_dir: Path) -> dict[str, Any]:
    return _read_json(run_dir / TRIAL_FILE)


@dataclass
class TrialRow:
    trial_id: str
    params: dict[str, Any]
    status: str
    metric_best: float = math.nan
    metric_last: float = math.nan
    epochs: int = 0
    planned_epochs: int = 0
    error: str = ""
    duration_s: float = math.nan
    train_s: float = 0.0  # sum of the epochs' seconds (training + validation) in this trial
    history: list[dict[str, Any]] = field(default_factory=list)
    started_at: float = math.nan  # time.time() when the trial started (its start order; NaN if it never said)

    @property
    def finished(self) -> bool:
        return self.status in (TERMINATED, STOPPED) and self.epochs > 0 and math.isfinite(self.metric_best)


def _finite(value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return math.nan
    return v if math.isfinite(v) else math.nan


def collect_trials(
    root: Path,
    metric: str,
    mode: str,
    tune_status: Mapping[str, str] | None = None,
    tune_errors: Mapping[str, str] | None = None,
) -> list[TrialRow]:
    """One row per trial folder: what the trial wrote (trial.json, metrics.csv) plus Ray Tune's status when known
    (``tune_status``: trial id -> TERMINATED / ERROR / RUNNING / PENDING...; by default the status the driver
    wrote into the trial folder, `STATUS_FILE`; ``tune_errors``: trial id -> error text, for a trial that died
    without recording its error, e.g. killed for memory)."""
    from raydefect.engine.run import METRICS_FILE, read_metrics_csv

    rows = []
    tune_status = tune_status or {}
    trials = root / TRIALS_DIR
    folders = sorted(p for p in trials.iterdir() if p.is_dir()) if trials.is_dir() else []
    for folder in folders:
        own = read_trial_record(folder)
        driver = _read_json(folder / DRIVER_FILE)
        record = {**driver, **own}  # the trial's own record wins; the driver's fills in what it never wrote
        if not record:
            continue
        history = read_metrics_csv(folder / METRICS_FILE)
        values = [_finite(r.get(metric)) for r in history]
        finite = [v for v in values if math.isfinite(v)]
        best = (max(finite) if mode == "max" else min(finite)) if finite else math.nan
        planned = int(record.get("planned_epochs") or 0)
        epochs = len(history)
        error = str(record.get("error") or "")
        status = tune_status.get(folder.name) or read_tune_status(folder)
        finished = TERMINATED if (epochs >= planned or record.get("stopped_by_patience")) else STOPPED
        if status == ERROR or (error and status != TERMINATED):
            status = ERROR
            error = error or (tune_errors or {}).get(folder.name) or "failed (see the Ray Tune error file in tune/)"
        elif status == TERMINATED or record.get("finished_at"):
            status, error = finished, ""  # Tune's word wins: a trial it stopped may have seen an error on the way
        else:
            status = status if status in (RUNNING, PENDING) else "INTERRUPTED"
        start = record.get("started_at")
        ends = [record.get("finished_at"), record.get("failed_at"), *[r.get("finished_at") for r in history]]
        ends = [float(e) for e in ends if e is not None and math.isfinite(_finite(e))]
        duration = (max(ends) - float(start)) if start and ends else math.nan
        rows.append(
            TrialRow(
                trial_id=folder.name,
                params=dict(record.get("params") or {}),
                status=status,
                metric_best=best,
                metric_last=values[-1] if values else math.nan,
                epochs=epochs,
                planned_epochs=planned,
                error=error,
                duration_s=duration,
                train_s=sum(_finite(r.get("seconds")) for r in history if math.isfinite(_finite(r.get("seconds")))),
                history=history,
                started_at=_finite(start) if start is not None else math.nan,
            )
        )
    return rows


def rank(rows: Sequence[TrialRow], mode: str) -> list[TrialRow]:
    """Finished trials best first: fully trained ones before those stopped early (fewer epochs is a lower fidelity),
    then by their best metric."""
    sign = -1.0 if mode == "max" else 1.0
    done = [r for r in rows if r.finished]
    return sorted(done, key=lambda r: (r.status != TERMINATED, sign * r.metric_best, r.trial_id))


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def write_trials_csv(root: Path, rows: Sequence[TrialRow], param_keys: Sequence[str], metric: str) -> Path:
    """trials.csv, atomically: trial id, one column per searched key, metric best/last, epochs, status, error, s."""
    columns = ["trial_id", *param_keys, f"{metric}_best", f"{metric}_last", "epochs", "status", "error", "duration_s"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for r in rows:
        writer.writerow(
            [
                r.trial_id,
                *[_cell(r.params.get(k)) for k in param_keys],
                _cell(r.metric_best),
                _cell(r.metric_last),
                r.epochs,
                r.status,
                " ".join(r.error.split())[:500],
                _cell(r.duration_s),
            ]
        )
    return write_text_atomic(root / TRIALS_CSV, buf.getvalue())


def write_best(study: Study, rows: Sequence[TrialRow]) -> Path | None:
    """best.yaml from the best finished trial (None, and no file, when no trial finished)."""
    t = study.base.tune
    ranked = rank(rows, t.mode)
    path = study.root / BEST_FILE
    if not ranked:
        path.unlink(missing_ok=True)
        return None
    best = ranked[0]
    cfg = best_config(study.base, best.params, study.name, study.root.parent)
    header = [
        f"# Best config of study {study.name}: trial {best.trial_id}, {t.metric} {best.metric_best:.4g} ({t.mode})",
        f"# after {best.epochs} of {best.planned_epochs} trial epochs ({best.status}); "
        f"{len([r for r in rows if r.finished])} of {len(rows)} trials finished.",
        f"# Params: {json.dumps(best.params, default=str)}",
        "# Full fidelity (the base config's data.subset, image size and epochs). Train it with",
        f"#   raydefect train --best {study.root}    (or: raydefect train --config {path})",
    ]
    body = yaml.safe_dump({"schema_version": SCHEMA_VERSION, **cfg.to_dict()}, sort_keys=False)
    write_text_atomic(path, "\n".join(header) + "\n" + body)
    return path


def summary_rows(rows: Sequence[TrialRow], param_keys: Sequence[str], metric: str, mode: str, top: int = 10) -> list:
    """The console table: best trials first, then the others (errors last)."""
    ranked = rank(rows, mode)
    rest = [r for r in rows if r not in ranked]
    out = []
    for r in [*ranked, *rest][:top]:
        row: dict[str, Any] = {"trial": r.trial_id.rsplit("_", 1)[-1]}
        for k in param_keys:
            v = r.params.get(k)
            row[k] = f"{v:.3g}" if isinstance(v, float) else v
        row[f"{metric} best"] = r.metric_best
        row["epochs"] = f"{r.epochs}/{r.planned_epochs}"
        row["status"] = r.status
        row["s"] = r.duration_s
        out.append(row)
    return out


def now() -> float:
    return time.time()
