"""`raydefect tune` on Ray Tune + Optuna, with Ray Train inside every trial (Ray 2.60's Train-inside-Tune).

``Tuner(trial_fn)``: each trial is a plain function (`_trial_fn`) that builds its training through the training
driver (`run_training`, a `TorchTrainer` named after the trial id, ``RunConfig(callbacks=[TuneReportCallback()])``
so every epoch's metrics reach Tune). The trial function itself reserves no CPU (``tune.with_resources``,
`TRIAL_DRIVER_RESOURCES`); the TorchTrainer's workers take ``resources.*``, and the number of concurrent trials is
derived from the cluster's GPUs (or CPUs) and those per-trial resources (``tune.max_concurrent`` overrides it).
Trial actors are not reused: a trial ASHA stops takes its TorchTrainer and the workers' resources with it.

Optuna TPE (`OptunaSearch`, seeded with ``tune.seed``, define-by-run for the conditional ranges) proposes; ASHA
(``time_attr="epoch"``) stops weak trials early. Trials report ``checkpoint_score``: ``tune.metric`` made finite
(a NaN metric ranks worst), which both Optuna and ASHA rank by.

Persistence: Ray Tune's experiment folder is ``<study>/tune``; ``--resume`` is ``Tuner.restore(resume_unfinished=
True)``: finished trials stay, unfinished ones start again and their TorchTrainer (same name, same folder) continues
from its last checkpoint. A trial that raises (a NaN loss, OOM, a bad value) is recorded as ERROR and the study goes
on (``FailureConfig(max_failures=0)``, failures never raise from ``fit``).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from raydefect import console
from raydefect.config import Config
from raydefect.errors import StudyError, TrainingError
from raydefect.pipelines.train import SCORE_KEY, run_training
from raydefect.tuning.space import SearchSpace, check_space, config_params, load_space, parse_space
from raydefect.tuning.study import (
    ERROR,
    STOPPED,
    TERMINATED,
    Study,
    TrialRow,
    check_name,
    collect_trials,
    default_study_name,
    find_study,
    planned_epochs,
    rank,
    read_study,
    study_dir,
    summary_rows,
    trial_config,
    write_best,
    write_driver_record,
    write_study,
    write_trial_record,
    write_trials_csv,
    write_tune_status,
)

#: Test hook: "KEY=VALUE": trials whose searched KEY has VALUE (compared as text) raise after training epoch 1.
FAIL_TRIALS_ENV = "RAYDEFECT_TEST_TUNE_FAIL"
#: What a trial's own function reserves: no CPU (its TorchTrainer's workers reserve resources.*), and memory for
#: the manifest it reads (Ray rejects an all-zero resource request, and memory is what the driver really uses).
TRIAL_DRIVER_RESOURCES = {"cpu": 0, "memory": 256 * 2**20}
#: Each trial's Ray Train worker group placement group id (see `release_placement_groups`).
PLACEMENT_GROUP_FILE = "placement_group"
_RELEASE_AFTER_S = 5.0
_STAGE_KEYS = ("schedule.frozen_epochs", "schedule.partial_epochs", "schedule.full_epochs")


@dataclass
class TuneResult:
    study: Study
    rows: list[TrialRow]
    best: TrialRow | None
    best_path: Path | None
    trials_csv: Path
    plots: dict[str, Path]
    concurrency: int
    seconds: float
    interrupted: bool


# --------------------------------------------------------------------------------------------------- trial
def _injected_failure(values: dict[str, Any], rule: str | None) -> bool:
    if not rule or "=" not in rule:
        return False
    key, value = rule.split("=", 1)
    return key in values and str(values[key]) == value


def _trial_fn(params: dict[str, Any], study: dict[str, Any]) -> None:
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

    def __init__(self, root: str, metric: str, mode: str, keys: list[str], base: Config | None = None) -> None:
        self.root, self.metric, self.mode, self.keys, self.base = root, metric, mode, keys, base
        self.to_release: dict[str, float] = {}  # trial id -> when it ended

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

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        values = config_params(trial.config)
        shown = ", ".join(f"{k}={_short(v)}" for k, v in values.items())
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


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


# ------------------------------------------------------------------------------------------------ driver
def concurrency(cfg: Config, use_gpu: bool, resources: dict[str, float]) -> int:
    """Concurrent trials: how many trials' worker groups fit the cluster at once (GPUs when training on GPUs,
    else CPUs), at least 1, at most num_samples; tune.max_concurrent overrides it."""
    r, t = cfg.resources, cfg.tune
    if t.max_concurrent is not None:
        return t.max_concurrent
    if use_gpu:
        fits = resources.get("GPU", 0.0) / (r.num_workers * r.gpus_per_worker)
    else:
        fits = resources.get("CPU", 0.0) / (r.num_workers * r.cpus_per_worker)
    return max(1, min(t.num_samples, math.floor(fits + 1e-9)))


def _max_epochs(base: Config, space: SearchSpace) -> int:
    probe = {p.key: int(p.high) for p in space.params if p.key in _STAGE_KEYS}  # type: ignore[arg-type]
    return max(planned_epochs(base, probe), planned_epochs(base, {}))


def _check_inputs(base: Config, space: SearchSpace) -> None:
    """What every trial would trip over, checked once before the study starts: the dataset and its splits, the
    metric name, and the weights of every backbone the space may pick (offline: in the local cache)."""
    from raydefect.data.manifest import load_dataset
    from raydefect.engine.fit import training_rows
    from raydefect.engine.loop import check_metric
    from raydefect.errors import DataError
    from raydefect.models.weights import check_weights_available

    backbones = space.get("model.backbone")
    for backbone in backbones.choices if backbones is not None else (base.model.backbone,):
        check_weights_available(trial_config(base, {"model.backbone": backbone}).model)

    if not base.data.dataset:
        raise DataError("no dataset: pass --data DATASET (a folder written by `raydefect prepare`)")
    dataset = load_dataset(base.data.dataset)
    check_metric(trial_config(base, {}), dataset.class_names)
    training_rows(trial_config(base, {}), dataset)


def tune_study(
    cfg: Config | None = None,
    *,
    space: str | None = None,
    resume: bool = False,
    name: str | None = None,
    runs_dir: str | Path | None = None,
    address: str | None = None,
) -> TuneResult:
    """Run (or with ``resume`` continue) a study into ``<runs_dir>/tune-<name>/``; see the module docstring."""
    start = time.perf_counter()
    if resume:
        root = find_study(name, runs_dir or (cfg.train.runs_dir if cfg else "runs"))
        study = read_study(root)
        parsed = parse_space(study.space, source=f"{root / 'study.yaml'}: space")
        if not (root / "tune").is_dir() or not tune.Tuner.can_restore(str(root / "tune")):
            raise StudyError(
                f"study {study.name} has no Ray Tune state to resume ({root / 'tune'}); start it again with another "
                "--name"
            )
    else:
        assert cfg is not None
        parsed, raw = load_space(space or cfg.tune.space)
        check_space(parsed, cfg, trial_config)
        _check_inputs(cfg, parsed)
        study_name = check_name(name or cfg.tune.name or default_study_name(cfg))
        root = study_dir(runs_dir or cfg.train.runs_dir, study_name)
        if (root / "study.yaml").exists():
            raise StudyError(
                f"study {study_name} already exists ({root}): continue it with `raydefect tune --resume --name "
                f"{study_name}` or pick another --name"
            )
        from raydefect.engine.run import prepare_runs_dir
        from raydefect.pipelines.cluster import connect

        connect(address)  # before the study folder exists: an unreachable cluster must not leave a study behind
        prepare_runs_dir(root.parent)
        base = cfg.replace(**{"tune.name": study_name, "tune.space": str(parsed.source)})
        study = write_study(root, study_name, base, raw, parsed.source)

    base = study.base
    t = base.tune
    from raydefect.pipelines.cluster import connect
    from raydefect.pipelines.train import uses_gpu

    resources = connect(address)
    use_gpu = uses_gpu(trial_config(base, {}))
    n_parallel = concurrency(base, use_gpu, resources)
    fail_rule = os.environ.get(FAIL_TRIALS_ENV) or None
    payload = {"base": base.to_dict(), "trials_dir": str(study.trials_dir), "fail_rule": fail_rule}
    trainable = tune.with_resources(tune.with_parameters(_trial_fn, study=payload), TRIAL_DRIVER_RESOURCES)
    keys = parsed.keys
    callback = StudyCallback(str(study.root), t.metric, t.mode, keys, base)
    study.trials_dir.mkdir(parents=True, exist_ok=True)

    verbose = console.verbosity() >= 1
    if not verbose:  # failed trials are reported in our own words (and trials.csv); Tune's tracebacks with -v
        logging.getLogger("ray.tune").setLevel(logging.CRITICAL)
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
    if resume:
        tuner = tune.Tuner.restore(
            str(study.tune_dir),
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=False,
            restart_errored=False,
        )
        done = [r for r in collect_trials(study.root, t.metric, t.mode) if r.finished]
        console.info(f"resuming study {study.name}: {len(done)} finished trial(s) kept, {study.root}")
    else:
        searcher = OptunaSearch(space=parsed, metric=SCORE_KEY, mode=t.mode, seed=t.seed)
        scheduler = ASHAScheduler(
            time_attr="epoch",
            metric=SCORE_KEY,
            mode=t.mode,
            max_t=_max_epochs(base, parsed) + 1,  # a trial's last epoch ends it, not ASHA
            grace_period=t.grace_period,
            reduction_factor=t.reduction_factor,
        )
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=searcher,
                scheduler=scheduler,
                num_samples=t.num_samples,
                max_concurrent_trials=n_parallel,
                time_budget_s=t.time_budget_s,
                trial_dirname_creator=trial_dirname,
                # a stopped trial's actor must go, taking its TorchTrainer (and the workers' resources) with it
                reuse_actors=False,
            ),
            run_config=tune.RunConfig(
                name="tune",
                storage_path=str(study.root),
                failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                callbacks=[callback],
                verbose=1 if verbose else 0,
            ),
        )
        fidelity = trial_config(base, {})
        console.info(
            f"study {study.name}: {t.num_samples} trials of {', '.join(keys)}; {n_parallel} at a time "
            f"({'GPU' if use_gpu else 'CPU'}, {base.resources.num_workers} worker(s) each); trials train "
            f"{fidelity.data.subset:g} of the training split at {fidelity.data.image_size} px for "
            f"{fidelity.schedule.total_epochs} epochs; metric {t.metric} ({t.mode})"
        )
        console.info(f"study folder: {study.root}")

    # Tune snapshots its experiment state at most this often (default 10 s): a killed driver loses less
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    if not verbose:  # Ray 2.60's new console output prints its configuration box and paths even at verbose=0
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    previous = signal.getsignal(signal.SIGTERM)
    _route_sigterm()
    try:
        grid = tuner.fit()
    finally:
        _restore_sigterm(previous)

    time.sleep(1.0)  # the stopped trials' actors are being killed: then no controller can start new workers
    for folder in sorted(study.trials_dir.iterdir()) if study.trials_dir.is_dir() else []:
        release_placement_group(folder)
    statuses: dict[str, str] = {}  # the rest: the Tune status each trial folder holds (StudyCallback)
    errors: dict[str, str] = {}
    for result in grid:
        if result.error is not None and result.path:
            trial_id = Path(result.path).name
            statuses[trial_id] = ERROR
            errors[trial_id] = f"{type(result.error).__name__}: {' '.join(str(result.error).split())[:300]}"
    return finish_study(study, parsed, statuses, errors, n_parallel, time.perf_counter() - start)


def finish_study(
    study: Study,
    space: SearchSpace,
    statuses: dict[str, str],
    errors: dict[str, str],
    n_parallel: int,
    seconds: float,
) -> TuneResult:
    """trials.csv, best.yaml, plots and the console summary from the study folder."""
    from raydefect.tuning.plots import write_study_plots

    t = study.base.tune
    rows = collect_trials(study.root, t.metric, t.mode, statuses, errors)
    trials_csv = write_trials_csv(study.root, rows, space.keys, t.metric)
    best_path = write_best(study, rows)
    plots = write_study_plots(study.root, rows, space, t.metric, t.mode)
    ranked = rank(rows, t.mode)
    unfinished = [r for r in rows if r.status not in (TERMINATED, STOPPED, ERROR)]
    interrupted = bool(unfinished) or (len(rows) < t.num_samples and t.time_budget_s is None)
    console.result("")
    if rows:
        console.result(console.table(summary_rows(rows, space.keys, t.metric, t.mode)))
    failed = sum(r.status == ERROR for r in rows)
    console.result(
        f"{len(ranked)} of {len(rows)} trials finished, {failed} failed, in {seconds:.0f} s ({n_parallel} at a time)"
    )
    if ranked:
        best = ranked[0]
        console.result(
            f"best:    trial {best.trial_id}: {t.metric} {best.metric_best:.4g} with "
            + ", ".join(f"{k}={_short(v)}" for k, v in best.params.items())
        )
        console.result(f"config:  {best_path}  ->  raydefect train --best {study.name}")
    else:
        console.warn(f"no trial finished, so no best.yaml; see {trials_csv}")
    console.result(f"trials:  {trials_csv} (plots in {study.root / 'plots'})")
    if interrupted:
        console.warn(
            f"study {study.name} did not finish: continue it with `raydefect tune --resume --name {study.name}`"
        )
    return TuneResult(
        study, rows, ranked[0] if ranked else None, best_path, trials_csv, plots, n_parallel, seconds, interrupted
    )


def _route_sigterm() -> None:
    """SIGTERM stops the study like Ctrl-C (Tune saves its state and stops the trials); only in the main thread."""
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGINT))


def _restore_sigterm(previous: Any) -> None:
    import threading

    if threading.current_thread() is threading.main_thread() and previous is not None:
        signal.signal(signal.SIGTERM, previous)
