"""The trials of a `raydefect tune` study: `trial_fn` (one Ray Train run per trial, at the trial's fidelity), their
folders and placement groups, their errors in one line, and `StudyCallback`, which records every trial in the
study folder as it ends. The driver (`raydefect.pipelines.tune`) runs them through Ray Tune."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from raydefect import console
from raydefect.config import Config
from raydefect.errors import TrainingError
from raydefect.pipelines.train import run_training
from raydefect.pipelines.train_worker import SCORE_KEY
from raydefect.tuning.space import config_params
from raydefect.tuning.study import (
    ERROR,
    TERMINATED,
    collect_trials,
    rank,
    trial_config,
    write_driver_record,
    write_trial_record,
    write_trials_csv,
    write_tune_status,
)

#: Test hook: "KEY=VALUE": trials whose searched KEY has VALUE (compared as text) raise after training epoch 1.
#: Test hook: "KEY=VALUE": trials whose searched KEY has VALUE (compared as text) raise after training epoch 1.
FAIL_TRIALS_ENV = "RAYDEFECT_TEST_TUNE_FAIL"


#: Each trial's Ray Train worker group placement group id (see `release_placement_groups`).
PLACEMENT_GROUP_FILE = "placement_group"


_RELEASE_AFTER_S = 5.0


# --------------------------------------------------------------------------------------------------- trial
def _injected_failure(values: dict[str, Any], rule: str | None) -> bool:
    if not rule or "=" not in rule:
        return False
    key, value = rule.split("=", 1)
    return key in values and str(values[key]) == value


def trial_fn(params: dict[str, Any], study: dict[str, Any]) -> None:
    """One trial (runs in a Tune actor holding no CPU): the training driver on the trial's config."""
    trial_id = tune.get_context().get_trial_id()
    base = Config.from_dict(study["base"], source="study")
    values = config_params(params)
    cfg = trial_config(base, values)
    trials_dir = Path(study["trials_dir"])
    run_dir = trials_dir / trial_id
    write_trial_record(run_dir, trial_id=trial_id, params=values, planned_epochs=cfg.schedule.total_epochs)
    from raydefect.tuning.study import read_trial_record

    if "started_at" not in read_trial_record(run_dir):
        write_trial_record(run_dir, started_at=time.time())
    fail_once = None
    if _injected_failure(values, study.get("fail_rule")):
        fail_once = f"1:{run_dir / '.injected-failure'}"
    try:
        result = run_training(
            cfg,
            name=trial_id,
            storage_path=trials_dir,
            callbacks=[TuneReportCallback()],
            export=False,
            show_progress=False,
            fail_once=fail_once,
            placement_group_file=str(run_dir / PLACEMENT_GROUP_FILE),
        )
    except Exception as e:
        write_trial_record(run_dir, error=trial_error_text(e), failed_at=time.time())
        raise
    write_trial_record(run_dir, finished_at=time.time(), stopped_by_patience=result.stopped_early, error=None)
    if not result.epochs_run and result.history:
        # finished before an interruption that Tune's state did not record yet: give Tune the final result
        last = dict(result.history[-1])
        value = last.get(cfg.schedule.metric)
        finite = isinstance(value, (int, float)) and math.isfinite(value)
        last[SCORE_KEY] = float(value) if finite else (-1e30 if cfg.schedule.mode == "max" else 1e30)
        tune.report({k: v for k, v in last.items() if not (isinstance(v, float) and math.isnan(v))})


def trial_error_summary(trace: Any) -> str:
    """One line from the error trace Ray Tune saved for a trial (its last line names the exception)."""
    lines = [line.strip() for line in str(trace or "").splitlines() if line.strip()]
    return " ".join(lines[-1].split())[:400] if lines else "failed before it reported (see the Ray Tune error file)"


def trial_error_text(exc: BaseException) -> str:
    """The cause of a trial's failure in one line: the worker's own exception rather than Ray's wrappers (a
    `TrainingError` from the driver wraps a worker-group error that holds each rank's exception)."""
    inner: BaseException = exc
    if isinstance(exc, TrainingError) and exc.__cause__ is not None:
        inner = exc.__cause__
    failures = getattr(inner, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
    cause = getattr(inner, "cause", None)
    if isinstance(cause, BaseException):
        inner = cause
    if inner is not exc and not isinstance(inner, BaseException):  # pragma: no cover - defensive
        inner = exc
    return f"{type(inner).__name__}: {' '.join(str(inner).split())[:400]}"


def release_placement_group(run_dir: Path) -> bool:
    """Remove the trial's Ray Train worker placement group if it outlived the trial. A trial that ASHA (or Ctrl-C)
    stops is killed with its TorchTrainer controller; Ray Train's clean-up of a dead controller's workers relies on the
    State API, which an embedded Ray without dashboard does not serve, so without this the workers' CPUs/GPUs stay
    reserved and later trials wait for ever. True when something was removed."""
    import ray
    from ray.util.placement_group import PlacementGroup

    try:
        pg_hex = (run_dir / PLACEMENT_GROUP_FILE).read_text(encoding="utf-8").strip()
    except OSError:
        return False
    info = ray.util.placement_group_table().get(pg_hex)
    if not info or info.get("state") == "REMOVED":
        return False
    ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_hex))))
    console.debug(f"released the worker placement group of trial {run_dir.name}")
    return True


def trial_dirname(trial: Any) -> str:
    return str(trial.trial_id)


# ------------------------------------------------------------------------------------------------ callback
class StudyCallback(tune.Callback):
    """On the driver: prints trial starts/ends, writes each trial's Tune status into its folder and rewrites
    trials.csv whenever a trial ends and when the study stops (so the record is complete after an interruption)."""

    def __init__(
        self, root: str, metric: str, mode: str, keys: list[str], base: Config | None = None, total: int | None = None
    ) -> None:
        self.root, self.metric, self.mode, self.keys, self.base = root, metric, mode, keys, base
        self.to_release: dict[str, float] = {}  # trial id -> when it ended
        self.progress: console.Progress | None = None  # trials ended of `total`, best so far: from the first start
        self.total = total

    def _release_due(self, now: float, force: bool = False) -> None:
        for trial_id, ended in list(self.to_release.items()):
            if force or now - ended >= _RELEASE_AFTER_S:  # by then its actor and controller are gone
                del self.to_release[trial_id]
                try:
                    release_placement_group(Path(self.root) / "trials" / trial_id)
                except Exception as e:  # pragma: no cover - never stop the study for this
                    console.warn(f"could not release trial {trial_id}'s workers: {e}")

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if self.to_release:
            self._release_due(time.time())

    def _run_dir(self, trial: Any) -> Path:
        return Path(self.root) / "trials" / str(trial.trial_id)

    def _mark(self, trial: Any, status: str) -> None:
        run_dir = self._run_dir(trial)
        if run_dir.is_dir():  # its own file: the trial's process writes trial.json at the same time
            write_tune_status(run_dir, status)

    def _refresh(self, done: Any = None) -> None:
        try:
            rows = collect_trials(Path(self.root), self.metric, self.mode)
            write_trials_csv(Path(self.root), rows, self.keys, self.metric)
        except Exception as e:  # never let the record keeping stop the study
            console.warn(f"could not update trials.csv: {e}")
            return
        row = next((r for r in rows if done is not None and r.trial_id == done.trial_id), None)
        if row is not None:
            what = (
                f"{self.metric} best {row.metric_best:.4g}, last {row.metric_last:.4g}"
                if row.status != ERROR
                else row.error[:160]
            )
            console.info(
                f"trial {row.trial_id} {row.status} after {row.epochs}/{row.planned_epochs} epochs "
                f"({row.duration_s:.0f} s): {what}"
            )
            if self.progress is not None:
                ranked = rank(rows, self.mode)
                if ranked:
                    self.progress.note(f"best {self.metric} {ranked[0].metric_best:.4g} (trial {ranked[0].trial_id})")
                self.progress.update(1)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.progress is None:
            self.progress = console.Progress("tune", self.total, unit="trial")
        values = config_params(trial.config)
        shown = ", ".join(f"{k}={short_value(v)}" for k, v in values.items())
        console.info(f"trial {trial.trial_id} started: {shown}")
        try:  # the driver's own record: a trial that dies before its function runs still gets a row
            planned = trial_config(self.base, values).schedule.total_epochs if self.base is not None else 0
            write_driver_record(
                self._run_dir(trial),
                trial_id=str(trial.trial_id),
                params=values,
                planned_epochs=planned,
                started_at=time.time(),
            )
        except Exception as e:  # pragma: no cover - never stop the study for this
            console.warn(f"could not record trial {trial.trial_id}: {e}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._mark(trial, TERMINATED)
        self.to_release[str(trial.trial_id)] = time.time()
        self._refresh(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        try:
            error = trial_error_summary(trial.get_error())
            write_driver_record(self._run_dir(trial), error=error, failed_at=time.time())
        except Exception as e:  # pragma: no cover - never stop the study for this
            console.warn(f"could not record trial {trial.trial_id}'s error: {e}")
        self._mark(trial, ERROR)
        self.to_release[str(trial.trial_id)] = time.time()
        self._refresh(trial)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        for trial in trials:  # after Ctrl-C / SIGTERM the unfinished ones are still RUNNING or PENDING
            self._mark(trial, str(trial.status))
        self._refresh()
        if self.progress is not None:
            self.progress.close()


def short_value(value: Any) -> str:
    """A parameter value as people read it in one line (floats to 3 significant digits)."""
    return f"{value:.3g}" if isinstance(value, float) else str(value)
