"""The CLI's global behaviour: fast --help, --version, one-line user errors with exit 1, usage errors exit 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from raydefect import __version__
from raydefect.cli import cli


def test_help_does_not_import_ray_or_torch():
    code = (
        "import sys\n"
        "from raydefect.cli import cli\n"
        "try:\n    cli(['--help'], prog_name='raydefect')\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('ray', 'torch', 'timm', 'pyarrow') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out
    assert "Usage:" in out


def test_version():
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_user_error_is_one_line_and_exit_1():
    result = CliRunner().invoke(cli, ["config", "--set", "optim.lrr=1"])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == ["error: --set: unknown key 'optim.lrr'; did you mean 'optim.lr'?"]
    assert "Traceback" not in result.output


def test_usage_error_exit_2():
    result = CliRunner().invoke(cli, ["config", "--no-such-option"])
    assert result.exit_code == 2


def test_config_shows_resolved_values_with_docs():
    result = CliRunner().invoke(cli, ["config", "--set", "optim.lr=3e-4"])
    assert result.exit_code == 0, result.output
    assert "  lr: 0.0003  # " in result.output
    listing = CliRunner().invoke(cli, ["config", "--list"])
    assert "default" in listing.output


def test_ray_client_addresses_are_refused_with_the_alternatives(tmp_path, tiny_artifact):
    """ray:// cannot run Ray Data jobs (tried against Ray 2.60): one line naming --address auto and job submission,
    before any Ray starts."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(b"not decoded before Ray starts")
    result = CliRunner().invoke(
        cli,
        ["--address", "ray://127.0.0.1:10001", "score", "--model", str(tiny_artifact), "--input", str(tmp_path / "in"),
         "--out", str(tmp_path / "out")],
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "Ray Client (ray://) cannot run" in result.output and "--address auto" in result.output
    assert "ray job submit" in result.output and "Traceback" not in result.output
    # the Jobs API's address where the GCS's is needed: the one thing it is for
    args = ["score", "--model", str(tiny_artifact), "--input", str(tmp_path / "in"), "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(cli, ["--address", "http://127.0.0.1:8265", *args])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "Ray Jobs API (dashboard) address" in result.output and "score --submit" in result.output


def test_an_address_where_nothing_answers_fails_in_seconds_naming_it(ray_session, monkeypatch):
    """ray.init retries a closed GCS port for good (11 minutes seen, the scores folder locked all along), and one
    that accepts connections and never answers for ~14 minutes (20 attempts of ~41 s)."""
    import socket
    import time

    from raydefect.errors import ClusterError
    from raydefect.pipelines import cluster
    from raydefect.pipelines.cluster import _check_reachable

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    start = time.monotonic()
    refused = rf"cannot reach Ray at '127.0.0.1:{port}' \(Connection refused\); is the cluster up"
    with pytest.raises(ClusterError, match=refused):
        _check_reachable(f"127.0.0.1:{port}")
    assert time.monotonic() - start < 5
    monkeypatch.setattr(cluster, "REACH_TIMEOUT_S", 2.0)
    with socket.socket() as s:  # accepts (the kernel queues the connection) and never answers: not a GCS
        s.bind(("127.0.0.1", 0))
        s.listen()
        silent = f"127.0.0.1:{s.getsockname()[1]}"
        with pytest.raises(ClusterError, match=rf"Ray at '{silent}' accepts connections but does not answer as a clu"):
            _check_reachable(silent)
    _check_reachable(ray_session.get_runtime_context().gcs_address)  # a GCS: passes


def test_console_tables_align_numbers_right_and_text_left_with_per_column_formats():
    from raydefect import console

    rows = [
        {"folder": "/a/Blowhole", "images": 115, "defect %": 87.0, "class": "ひび"},
        {"folder": "/a/b", "images": 5, "defect %": 89.44, "class": None},
    ]
    lines = console.table(rows, formats={"defect %": ".1f"}).splitlines()
    assert lines == [
        "folder       images  defect %  class",
        "-----------  ------  --------  -----",
        "/a/Blowhole     115      87.0  ひび",
        "/a/b              5      89.4",
    ]


def test_first_line_marks_where_it_cut_a_long_message():
    from raydefect.errors import first_line

    assert first_line(OSError("short\nsecond line")) == "short"
    assert first_line(ValueError()) == "ValueError"
    cut = first_line(OSError("x" * 250), limit=200)
    assert len(cut) == 200 and cut.endswith("x...")
    words = first_line(OSError("Please check your connection and try again " * 6), limit=100)
    assert len(words) <= 100 and words.endswith("...")
    assert all(w in ["Please", "check", "your", "connection", "and", "try", "again"] for w in words[:-3].split())


def test_connecting_to_a_cluster_that_is_slow_to_answer_says_so(monkeypatch, capsys):
    """A cluster that refuses this machine's token answers ray.init only after ~20 s of retries; the run said nothing
    meanwhile. (ray.init stands in here: a real refusal needs a second cluster with other tokens.)"""
    import time

    import ray

    from raydefect.errors import ClusterError
    from raydefect.pipelines import cluster

    def slow_refusal(**kwargs):
        time.sleep(1.0)
        raise ConnectionError("Failed to connect to Ray cluster")

    monkeypatch.setattr(cluster, "SLOW_CONNECT_S", 0.3)
    monkeypatch.setattr(cluster, "_check_reachable", lambda address: None)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", slow_refusal)
    with pytest.raises(ClusterError, match="cannot reach Ray at '10.0.0.9:6379'"):
        cluster.connect("10.0.0.9:6379")
    assert capsys.readouterr().out == (
        "Ray at 10.0.0.9:6379: no answer yet after 0 s, still connecting (a cluster that refuses this machine's token "
        "says so after about 20 s)\n"
    )


def test_console_waiting_speaks_only_for_a_block_that_outlasts_it(capsys):
    import time

    from raydefect import console

    with console.waiting("slow store", 0.2):
        time.sleep(0.5)
    with console.waiting("fast store", 0.3):
        pass
    time.sleep(0.5)  # past the fast block's delay: its timer was cancelled
    assert capsys.readouterr().out == "slow store\n"


def test_counts_read_in_the_right_number():
    from raydefect.console import count

    assert count(1, "image") == "1 image" and count(0, "image") == "0 images" and count(12345, "file") == "12,345 files"
    assert (
        count(1, "defect class", "defect classes") == "1 defect class" and count(3, "class", "classes") == "3 classes"
    )
