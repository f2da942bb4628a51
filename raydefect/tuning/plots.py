"""Study plots: optimisation history, parameter importance, metric vs learning rate per backbone (PNG, Agg)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from raydefect.tuning.space import SearchSpace
from raydefect.tuning.study import TERMINATED, TrialRow
from raydefect.viz.plots import draw_undefined, new_figure, save_figure

_COLORS = ("#1f4e79", "#d9531e", "#2e8b57", "#8e44ad", "#b8860b", "#c0392b")


def start_order(rows: Sequence[TrialRow]) -> list[TrialRow]:
    """Trials in the order they started (a trial that never recorded its start last, then by id): the order Optuna
    saw their results in, which trial ids (assigned when queued) need not follow."""
    return sorted(rows, key=lambda r: (not math.isfinite(r.started_at), r.started_at, r.trial_id))


def plot_history(rows: Sequence[TrialRow], metric: str, mode: str, path: Path) -> Path:
    """Each finished trial's best metric in start order (1, 2, ...: integer ticks), and the best so far."""
    from matplotlib.ticker import MaxNLocator

    fig = new_figure(7, 4.5)
    ax = fig.add_subplot()
    done = [(i, r) for i, r in enumerate(start_order(rows), start=1) if r.finished]
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if not done:
        draw_undefined(ax, "no finished trial yet")
    else:
        xs = [i for i, _ in done]
        ys = [r.metric_best for _, r in done]
        full = [r.status == TERMINATED for _, r in done]
        ax.scatter(
            [x for x, f in zip(xs, full, strict=True) if f],
            [y for y, f in zip(ys, full, strict=True) if f],
            color=_COLORS[0],
            label="trial (all epochs)",
            zorder=3,
        )
        ax.scatter(
            [x for x, f in zip(xs, full, strict=True) if not f],
            [y for y, f in zip(ys, full, strict=True) if not f],
            color=_COLORS[0],
            facecolors="none",
            label="trial (stopped early)",
            zorder=3,
        )
        best, running = [], -math.inf if mode == "max" else math.inf
        for y in ys:
            running = max(running, y) if mode == "max" else min(running, y)
            best.append(running)
        ax.step(xs, best, where="post", color=_COLORS[1], label="best so far")
        ax.legend(loc="best", fontsize=8)
    failed = sum(1 for r in rows if r.status == "ERROR")
    ax.set_xlabel("trial (start order)")
    ax.set_ylabel(f"{metric} (best epoch)")
    ax.set_title(f"Optimisation history: {len(done)} finished, {failed} failed")
    return save_figure(fig, path)


def _encode(values: list[Any]) -> list[float] | None:
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return [float(v) for v in values]
    levels = {v: i for i, v in enumerate(dict.fromkeys(map(str, values)))}
    return [float(levels[str(v)]) for v in values]


def importances(rows: Sequence[TrialRow], space: SearchSpace, mode: str) -> tuple[dict[str, float], str]:
    """Parameter importance over the finished trials: Optuna's default importance evaluator on a study rebuilt from
    them (one distribution per key: a conditional range becomes the union of its branches); when the evaluator
    cannot rank them (too few or identical trials), |Spearman rank correlation| between each parameter and the
    metric."""
    done = [r for r in rows if r.finished and all(k in r.params for k in space.keys)]
    if len(done) < 2:
        return {}, "needs 2 finished trials"
    try:
        import optuna
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        dists: dict[str, Any] = {}
        for p in space.params:
            if p.type == "categorical":
                dists[p.key] = CategoricalDistribution(list(p.choices))
            else:
                lows = [p.low, *[lo for lo, _ in p.ranges.values()]]
                highs = [p.high, *[hi for _, hi in p.ranges.values()]]
                if p.type == "int":
                    dists[p.key] = IntDistribution(int(min(lows)), int(max(highs)), log=p.log)
                else:
                    dists[p.key] = FloatDistribution(min(lows), max(highs), log=p.log)
        study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
        for r in done:
            study.add_trial(
                optuna.trial.create_trial(
                    params={k: r.params[k] for k in space.keys}, distributions=dists, value=r.metric_best
                )
            )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            values = dict(optuna.importance.get_param_importances(study))
        if any("same set of trials" in str(w.message) for w in caught) or not values:
            raise ValueError("the evaluator cannot separate these trials")
        return values, f"Optuna, {len(done)} trials"
    except Exception:  # too few / degenerate trials for the evaluator: fall back to rank correlation
        from scipy.stats import spearmanr

        metric = [r.metric_best for r in done]
        out = {}
        for key in space.keys:
            xs = _encode([r.params[key] for r in done])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a constant metric: no correlation (NaN -> 0 below)
                rho = spearmanr(xs, metric).statistic if xs and len(set(xs)) > 1 else 0.0
            out[key] = abs(float(rho)) if math.isfinite(rho) else 0.0
        total = sum(out.values())
        return ({k: v / total for k, v in out.items()} if total else out), "|Spearman rho| (fallback)"


def plot_importance(rows: Sequence[TrialRow], space: SearchSpace, mode: str, path: Path) -> Path:
    values, method = importances(rows, space, mode)
    fig = new_figure(7, 0.6 + 0.45 * max(3, len(space.keys)))
    ax = fig.add_subplot()
    if not values:
        draw_undefined(ax, f"parameter importance {method}")
    else:
        keys = sorted(values, key=values.get)
        ax.barh(keys, [values[k] for k in keys], color=_COLORS[0])
        ax.set_xlabel("importance (sums to 1)")
    ax.set_title(f"Parameter importance ({method})")
    return save_figure(fig, path)


def plot_lr_by_backbone(
    rows: Sequence[TrialRow], metric: str, path: Path, lr_key: str = "optim.lr", group_key: str = "model.backbone"
) -> Path:
    fig = new_figure(7, 4.5)
    ax = fig.add_subplot()
    done = [r for r in rows if r.finished and lr_key in r.params]
    if not done:
        draw_undefined(ax, f"no finished trial with {lr_key} searched")
    else:
        groups: dict[str, list[TrialRow]] = {}
        for r in done:
            groups.setdefault(str(r.params.get(group_key, "all")), []).append(r)
        for i, (name, items) in enumerate(sorted(groups.items())):
            ax.scatter(
                [float(r.params[lr_key]) for r in items],
                [r.metric_best for r in items],
                color=_COLORS[i % len(_COLORS)],
                label=name,
                zorder=3,
            )
        ax.set_xscale("log")
        ax.legend(title=group_key, loc="best", fontsize=8)
    ax.set_xlabel(lr_key)
    ax.set_ylabel(f"{metric} (best epoch)")
    ax.set_title(f"{metric} vs learning rate per backbone")
    return save_figure(fig, path)


def write_study_plots(root: Path, rows: Sequence[TrialRow], space: SearchSpace, metric: str, mode: str) -> dict:
    plots = root / "plots"
    return {
        "history": plot_history(rows, metric, mode, plots / "optimisation_history.png"),
        "importance": plot_importance(rows, space, mode, plots / "param_importance.png"),
        "lr": plot_lr_by_backbone(rows, metric, plots / "metric_vs_lr.png"),
    }
