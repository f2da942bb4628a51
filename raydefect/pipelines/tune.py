"""`raydefect tune` on Ray Tune + Optuna, with Ray Train inside every trial (Ray 2.60's Train-inside-Tune).

``Tuner(trial_fn)``: each trial is a plain function (`trial_fn`) that builds its training through the training
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
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from raydefect import console
from raydefect.config import Config
from raydefect.errors import StudyError
from raydefect.pipelines.train_worker import SCORE_KEY
from raydefect.pipelines.tune_trials import (
    FAIL_TRIALS_ENV,
    StudyCallback,
    release_placement_group,
    short_value,
    trial_dirname,
    trial_fn,
)
from raydefect.tuning.space import SearchSpace, check_space, load_space, parse_space
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
    write_study,
    write_trials_csv,
)

#: What a trial's own function reserves: no CPU (its TorchTrainer's workers reserve resources.*), and memory for
#: the manifest it reads (Ray rejects an all-zero resource request, and memory is what the driver really uses).
TRIAL_DRIVER_RESOURCES = {"cpu": 0, "memory": 256 * 2**20}
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
    study, parsed = _open_study(cfg, space=space, resume=resume, name=name, runs_dir=runs_dir, address=address)
    base = study.base
    t = base.tune
    from raydefect.pipelines.cluster import connect
    from raydefect.pipelines.train import uses_gpu

    resources = connect(address, log_dir=study.root)
    use_gpu = uses_gpu(trial_config(base, {}))
    n_parallel = concurrency(base, use_gpu, resources)
    fail_rule = os.environ.get(FAIL_TRIALS_ENV) or None
    payload = {"base": base.to_dict(), "trials_dir": str(study.trials_dir), "fail_rule": fail_rule}
    trainable = tune.with_resources(tune.with_parameters(trial_fn, study=payload), TRIAL_DRIVER_RESOURCES)
    keys = parsed.keys
    callback = StudyCallback(str(study.root), t.metric, t.mode, keys, base, total=t.num_samples)
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
        tuner = _new_tuner(trainable, study, parsed, n_parallel, callback, use_gpu)

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
    statuses, errors = _trial_errors(grid)
    return finish_study(study, parsed, statuses, errors, n_parallel, time.perf_counter() - start)


def _open_study(
    cfg: Config | None,
    *,
    space: str | None,
    resume: bool,
    name: str | None,
    runs_dir: str | Path | None,
    address: str | None,
) -> tuple[Study, Any]:
    """(the study, its parsed search space): an interrupted one found again, or a new one checked and written (its
    folder only once the cluster answered)."""
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

        # before the study folder exists: an unreachable cluster must not leave a study behind
        connect(address, log_dir=root.parent)
        prepare_runs_dir(root.parent)
        base = cfg.replace(**{"tune.name": study_name, "tune.space": str(parsed.source)})
        study = write_study(root, study_name, base, raw, parsed.source)

    return study, parsed


def _new_tuner(trainable: Any, study: Study, parsed: Any, n_parallel: int, callback: Any, use_gpu: bool) -> Any:
    """A new study's `Tuner`: Optuna's TPE proposes, ASHA stops weak trials early, `n_parallel` trials at a time."""
    base = study.base
    t = base.tune
    keys = parsed.keys
    verbose = console.verbosity() >= 1
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
    return tuner


def _trial_errors(grid: Any) -> tuple[dict[str, str], dict[str, str]]:
    """(Tune status, error) of each trial that failed, by trial folder name; the rest: the status each trial folder
    holds (`StudyCallback`)."""
    statuses: dict[str, str] = {}
    errors: dict[str, str] = {}
    for result in grid:
        if result.error is not None and result.path:
            trial_id = Path(result.path).name
            statuses[trial_id] = ERROR
            errors[trial_id] = f"{type(result.error).__name__}: {' '.join(str(result.error).split())[:300]}"
    return statuses, errors


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
            + ", ".join(f"{k}={short_value(v)}" for k, v in best.params.items())
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
