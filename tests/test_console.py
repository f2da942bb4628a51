"""Progress display: a tqdm bar on a terminal, plain periodic lines (no ANSI codes, no carriage returns) elsewhere,
nothing with -q; and lines printed meanwhile are not mixed into the bar."""

from __future__ import annotations

import io

import pytest

from raydefect import console


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def normal_verbosity():
    before = console.verbosity()
    console.set_verbosity(0)
    yield
    console.set_verbosity(before)


def test_a_terminal_gets_a_bar_with_rate_and_eta():
    out = _Terminal()
    with console.progress("predict", 100, stream=out) as bar:
        for _ in range(10):
            bar.update(10)
    text = out.getvalue()
    assert "\r" in text  # redrawn in place
    assert "predict" in text and "100/100" in text and "100%" in text and "images/s" in text


def test_elsewhere_plain_lines_with_percent_rate_and_eta():
    out = io.StringIO()  # not a terminal: a file, cron's mail, a Ray Jobs log
    with console.progress("score", stream=out, every=0.0) as bar:
        bar.update(5)  # the total is not known yet (listing)
        bar.set_total(20)
        bar.note("listed 20, already scored 0")
        bar.update(5)
        bar.set_done(20)
    lines = out.getvalue().splitlines()
    assert "\x1b" not in out.getvalue() and "\r" not in out.getvalue()
    assert lines[0].startswith("score: 5 images, ") and "images/s" in lines[0]
    assert lines[1].startswith("score: 10/20 images (50%), ") and "ETA " in lines[1]
    assert lines[1].endswith("listed 20, already scored 0")
    assert lines[-1].startswith("score: 20/20 images (100%)")  # the last line when it ends


def test_plain_lines_come_every_few_seconds_not_per_update():
    out = io.StringIO()
    with console.progress("evaluate", 1000, stream=out) as bar:  # the default interval: seconds
        for _ in range(1000):
            bar.update()
    assert out.getvalue().splitlines() == [out.getvalue().splitlines()[-1]]  # only the final line
    assert out.getvalue().startswith("evaluate: 1,000/1,000 images (100%)")


def test_quiet_shows_no_progress_and_singular_units():
    console.set_verbosity(-1)
    out = _Terminal()
    with console.progress("tune", 4, unit="trial", stream=out) as bar:
        bar.update()
    assert out.getvalue() == ""
    console.set_verbosity(0)
    plain = io.StringIO()
    with console.progress("tune", 1, unit="trial", stream=plain, every=0.0) as bar:
        bar.update()
    assert plain.getvalue().splitlines()[0].startswith("tune: 1/1 trial (100%), ")


def test_lines_printed_during_a_bar_go_above_it(capsys):
    out = _Terminal()
    with console.progress("tune", 2, unit="trial", stream=out):
        console.info("trial t1 started")
    assert "trial t1 started" in capsys.readouterr().out
    assert "trial t1 started" not in out.getvalue()


def test_training_shows_the_epochs_images_from_rank_0s_progress_file(tmp_path, capsys):
    """Train printed one row per epoch and nothing between (25 s and more on real data)."""
    import json

    from raydefect.engine.run import PROGRESS_FILE, append_metrics_row
    from raydefect.pipelines.train import _ProgressPrinter

    printer = _ProgressPrinter(tmp_path / "metrics.csv", after_epoch=0)
    for images in (8, 16):
        (tmp_path / PROGRESS_FILE).write_text(json.dumps({"epoch": 1, "images": images, "total": 16}))
        printer.poll()
    assert printer.bar is not None and printer.bar.done == 16 and printer.bar.total == 16
    append_metrics_row(tmp_path / "metrics.csv", {"epoch": 1, "stage": 1, "train_loss": 0.5, "val_score": 0.4})
    printer.poll()  # the epoch's row: its bar ends with a plain line (not a terminal here), then the row
    captured = capsys.readouterr()
    assert captured.err.splitlines()[-1].startswith("epoch 1: 16/16 images (100%)")
    assert captured.out.splitlines()[-1].split()[0] == "1"
    assert printer.bar is None
    # rank 0 is already in epoch 3 when epoch 2's row appears: epoch 3's bar stays, and no bar is shown twice
    (tmp_path / PROGRESS_FILE).write_text(json.dumps({"epoch": 3, "images": 4, "total": 16}))
    printer.poll()
    append_metrics_row(tmp_path / "metrics.csv", {"epoch": 2, "stage": 1, "train_loss": 0.4, "val_score": 0.5})
    printer.poll()
    assert printer.bar is not None and printer.bar_epoch == 3 and printer.bar.done == 4
    append_metrics_row(tmp_path / "metrics.csv", {"epoch": 3, "stage": 1, "train_loss": 0.3, "val_score": 0.6})
    printer.poll()
    printer.poll()
    err = capsys.readouterr().err.splitlines()
    assert [line.split(":")[0] for line in err] == ["epoch 3"]  # epoch 2's bar never drawn after its row


def test_the_raydefect_command_sends_third_party_notices_to_a_log_file(tmp_path):
    """`make demo` showed "(raylet) WARNING: 8 PYTHON worker processes have been started" three times and a red
    C++ "E ... core_worker.cc" line at every score run. In the `raydefect` command (not -v) they, Python warnings and
    library log records go to the run folder's log; raydefect's own lines and errors still reach the console."""
    import os
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        f"""
        import logging, os, warnings
        from raydefect import console
        from raydefect.pipelines import cluster
        console.allow_notice_routing()
        console.set_verbosity(0)
        path = cluster.route_notices({str(tmp_path)!r})
        print("\\x1b[33m(raylet)\\x1b[0m WARNING: 8 PYTHON worker processes have been started on node: x")
        print("(raylet, ip=10.0.0.2) WARNING: 12 PYTHON worker processes have been started")
        os.write(2, b"E core_worker.cc:2465 something Ray logs in C++\\\\n")
        warnings.warn("a third-party deprecation")
        logging.getLogger("ray.data").warning("a library notice")
        console.warn("raydefect's own warning")
        console.info("raydefect's own line")
        print("LOG", path)
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    shown = run.stdout + run.stderr
    assert "warning: raydefect's own warning" in run.stderr and "raydefect's own line" in run.stdout
    for noise in ("PYTHON worker processes", "core_worker.cc", "third-party deprecation", "a library notice"):
        assert noise not in shown, shown
    log = (tmp_path / "_raydefect-notices.log").read_text()
    assert f"LOG {tmp_path / '_raydefect-notices.log'}" in run.stdout
    for noise in ("8 PYTHON worker processes", "(raylet, ip=10.0.0.2)", "core_worker.cc", "third-party deprecation",
                  "a library notice"):  # fmt: skip
        assert noise in log, log


@pytest.mark.parametrize(("verbosity", "to_driver"), [(0, False), (1, True)])
def test_worker_output_reaches_the_driver_only_with_v(monkeypatch, verbosity, to_driver):
    """Workers' own output reaches the driver through Ray's
    ``log_to_driver``: off unless -v."""
    import ray

    from raydefect.pipelines import cluster

    seen = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 1.0})
    monkeypatch.setattr(console, "verbosity", lambda: verbosity)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cluster.connect(None)
    assert seen["log_to_driver"] is to_driver and seen["address"] == "local"


def test_the_final_plain_line_is_not_repeated():
    out = io.StringIO()
    with console.progress("evaluate", 3, stream=out, every=0.0) as bar:
        bar.update(3)  # printed now (the interval has passed) ...
    assert out.getvalue().count("evaluate: 3/3 images (100%)") == 1  # ... and not again at the end


def test_tune_counts_trials_of_n_with_the_best_so_far(tmp_path, capsys):
    """tune printed one line per trial: no "k of N", no best so far, no ETA."""
    from types import SimpleNamespace

    from raydefect.engine.run import append_metrics_row
    from raydefect.pipelines.tune_trials import StudyCallback
    from raydefect.tuning.study import TERMINATED, write_trial_record

    cb = StudyCallback(str(tmp_path), "val_score", "max", [], None, total=3)
    for trial_id, score in (("t0", 0.4), ("t1", 0.7)):
        trial = SimpleNamespace(trial_id=trial_id, config={}, status=TERMINATED)
        cb.on_trial_start(0, [], trial)
        run_dir = tmp_path / "trials" / trial_id
        write_trial_record(run_dir, params={}, planned_epochs=1, started_at=1.0, finished_at=2.0)
        append_metrics_row(run_dir / "metrics.csv", {"epoch": 1, "val_score": score, "seconds": 1.0})
        cb.on_trial_complete(0, [], trial)
    assert cb.progress.done == 2 and cb.progress.total == 3
    assert cb.progress.line().startswith("tune: 2/3 trials (67%)")
    assert cb.progress.line().endswith("best val_score 0.7 (trial t1)")
    cb.on_experiment_end([])
    assert capsys.readouterr().err.splitlines()[-1].startswith("tune: 2/3 trials (67%)")
