"""`raydefect score` / `raydefect scores` on the command line, `--submit`, and the deployable files in jobs/.

None of these start Ray: user errors are found before the cluster is needed, submission is checked against a fake
`JobSubmissionClient` (the public boundary of Ray's Jobs API), and scores folders are built with the core scorer.
"""

from __future__ import annotations

import importlib.util
import shlex
from pathlib import Path
from typing import ClassVar

import pytest
import yaml
from click.testing import CliRunner

from raydefect.cli import cli
from raydefect.models.artifact import read_artifact_meta
from raydefect.scoring.keys import KeySet
from raydefect.scoring.records import RunRecord, StagedFile, write_staged
from raydefect.scoring.results import WHERE_COLUMNS, read_scores
from raydefect.scoring.schema import file_metadata
from raydefect.scoring.scorer import BatchScorer
from raydefect.scoring.storage import Storage
from raydefect.scoring.store import ScoreStore

ROOT = Path(__file__).parents[1]


def _invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def _one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for f in fragments:
        assert f in lines[0], lines[0]


def test_score_user_errors_need_no_cluster(tmp_path, tiny_artifact, synth_archive):
    archive = synth_archive["out"]
    r = _invoke("score", "--model", str(tmp_path / "nope"), "--input", archive, "--out", str(tmp_path / "o"))
    _one_line_error(r, "model artifact not found", "runs/<name>/model")
    r = _invoke("score", "--model", str(tiny_artifact), "--input", str(tmp_path / "gone"), "--out", str(tmp_path / "o"))
    _one_line_error(r, "--input", "not found")
    (tmp_path / "empty").mkdir()
    r = _invoke("score", "--model", str(tiny_artifact), "--input", str(tmp_path / "empty"), "--out", str(tmp_path))
    _one_line_error(r, "empty folder")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "report.pdf").write_text("x")
    r = _invoke("score", "--model", str(tiny_artifact), "--input", archive, "--out", str(tmp_path / "taken"))
    _one_line_error(r, "not empty and holds no raydefect scores", "choose a new or empty folder")
    r = _invoke("score", "--model", str(tiny_artifact), "--input", archive, "--out", "/proc/raydefect-scores")
    _one_line_error(r, "--out /proc/raydefect-scores")
    r = _invoke(
        "score", "--model", str(tiny_artifact), "--input", archive, "--out", str(tmp_path), "--set", "score.x=1"
    )
    _one_line_error(r, "unknown key 'score.x'")
    # a report file that could not be written at the end of a long run, or that would break pd.read_parquet(OUT)
    base = ["score", "--model", str(tiny_artifact), "--input", archive, "--out", str(tmp_path / "s")]
    r = _invoke(*base, "--json", str(tmp_path / "no-such-dir" / "r.json"))
    _one_line_error(r, "--json", "no-such-dir does not exist")
    r = _invoke(*base, "--json", str(tmp_path / "s" / "last-run.json"))
    _one_line_error(r, "inside the scores folder", "name it _last-run.json")
    assert not (tmp_path / "s").exists()  # refused before anything was created


def test_score_refuses_an_output_locked_by_another_run(tmp_path, tiny_artifact, synth_archive):
    store = ScoreStore(str(tmp_path / "scores"))
    store.open()
    with store.lock("20250101T013000Z-abcdef"):
        r = _invoke("score", "--model", str(tiny_artifact), "--input", synth_archive["out"], "--out", store.out)
    _one_line_error(r, "locked by run 20250101T013000Z-abcdef (pid ", "on host", "wait for it to finish")


class _FakeJobClient:
    """Stands in for `ray.job_submission.JobSubmissionClient` and records what was submitted."""

    calls: ClassVar[list[dict]] = []

    def __init__(self, address: str) -> None:
        self.address = address

    def submit_job(self, *, entrypoint: str, runtime_env: dict | None = None) -> str:
        _FakeJobClient.calls.append({"address": self.address, "entrypoint": entrypoint, "runtime_env": runtime_env})
        return "raysubmit_test123"


def test_ctrl_c_or_sigterm_during_a_commit_waits_for_its_end_and_a_second_one_stops_at_once(capsys):
    import os
    import signal

    from raydefect.errors import Terminated
    from raydefect.pipelines.signals import CommitGuard as _CommitGuard

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    guard, done = _CommitGuard(), []
    with pytest.raises(KeyboardInterrupt) as raised, guard.hold():  # once the block is over
        os.kill(os.getpid(), signal.SIGINT)
        done.append("committed")
    assert done == ["committed"] and not isinstance(raised.value, Terminated) and not guard.forced
    assert "stopping after the commit in progress" in capsys.readouterr().err
    with pytest.raises(Terminated), guard.hold():  # SIGTERM: the same, exit 143 in the CLI
        os.kill(os.getpid(), signal.SIGTERM)
        done.append("committed")
    assert done == ["committed"] * 2 and not guard.forced
    with pytest.raises(KeyboardInterrupt), guard.hold():  # twice: at once, and the run commits nothing more
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        done.append("not reached")
    assert guard.forced and done == ["committed"] * 2
    guard = _CommitGuard()
    # the final commit of a run already stopping: one signal is enough
    with pytest.raises(Terminated), guard.hold(stopping=True):
        os.kill(os.getpid(), signal.SIGTERM)
        done.append("not reached")
    assert guard.forced and done == ["committed"] * 2
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    with guard.hold():  # no signal: nothing raised
        done.append("quiet")
    assert done[-1] == "quiet"


def test_submit_builds_a_safe_entrypoint_and_passes_secrets_by_name(monkeypatch, tmp_path):
    import ray.job_submission

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", _FakeJobClient)
    monkeypatch.setenv("FACTORY_S3_SECRET", "s3cr3t-value")
    _FakeJobClient.calls.clear()
    nasty = "s3://bucket/archive; rm -rf / #"
    r = _invoke(
        "--address", "http://head:8265", "score", "--submit", "--model", "s3://bucket/models/m1",
        "--input", nasty, "--out", "s3://bucket/scores", "--batch-size", "7", "--rescore",
        "--env", "FACTORY_S3_SECRET",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "submitted job raysubmit_test123 to http://head:8265" in r.output
    (call,) = _FakeJobClient.calls
    assert call["address"] == "http://head:8265"
    argv = shlex.split(call["entrypoint"])
    assert argv[:8] == ["raydefect", "score", "--model", "s3://bucket/models/m1", "--input", nasty, "--out",
                        "s3://bucket/scores"]  # fmt: skip
    assert "score.batch_size=7" in argv and "--rescore" in argv and "--submit" not in argv
    assert "s3cr3t-value" not in call["entrypoint"] and "s3cr3t-value" not in r.output
    assert call["runtime_env"] == {"env_vars": {"FACTORY_S3_SECRET": "s3cr3t-value"}}
    r = _invoke("--address", "head:6379", "score", "--submit", "--model", "m", "--input", "i", "--out", "o")
    _one_line_error(r, "--submit needs the cluster's dashboard address", "(got 'head:6379', a GCS address)")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    r = _invoke("score", "--submit", "--model", "m", "--input", "i", "--out", "o")
    _one_line_error(r, "--submit needs", "(none given: --address or RAY_ADDRESS)")
    r = _invoke("--address", "http://h:8265", "score", "--submit", "--model", "m", "--input", "i", "--out", "o",
                "--env", "NOT_SET_ANYWHERE_42")  # fmt: skip
    _one_line_error(r, "NOT_SET_ANYWHERE_42", "not set")


def test_submit_sends_local_paths_absolute_and_passes_dry_run_and_json_on(monkeypatch, tmp_path):
    """A relative path was resolved in the job's working directory on the head (where `ray start` ran): the job
    failed, or wrote its scores elsewhere; --dry-run was dropped, so a preview scored and wrote everything."""
    import ray.job_submission

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", _FakeJobClient)
    monkeypatch.chdir(tmp_path)
    _FakeJobClient.calls.clear()
    r = _invoke(
        "--address", "http://head:8265", "score", "--submit", "--model", "runs/m/model", "--input", "s3://b/a/",
        "--out", "scores", "--dry-run", "--json", "last.json",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    argv = shlex.split(_FakeJobClient.calls[0]["entrypoint"])
    opt = {argv[i]: argv[i + 1] for i in range(2, len(argv) - 1) if argv[i].startswith("--")}
    assert opt["--model"] == str(tmp_path / "runs/m/model") and opt["--out"] == str(tmp_path / "scores")
    assert opt["--input"] == "s3://b/a/" and opt["--json"] == str(tmp_path / "last.json")
    assert "--dry-run" in argv
    assert f"--out {tmp_path / 'scores'} is a local path: it must exist on the cluster's head node" in r.output


def test_submit_to_a_cluster_wanting_a_token_says_how_to_give_it(monkeypatch, no_ray_token):
    import ray.job_submission
    from ray.exceptions import AuthenticationError

    class _Refusing(_FakeJobClient):
        def __init__(self, address: str) -> None:
            raise AuthenticationError("Authentication required: Unauthorized: Missing authentication token")

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", _Refusing)
    r = _invoke("--address", "http://h:8265", "score", "--submit", "--model", "s3://b/m", "--input", "s3://b/a",
                "--out", "s3://b/s")  # fmt: skip
    _one_line_error(r, "cannot submit to http://h:8265: Authentication required", "set RAY_AUTH_MODE=token")


def test_scores_commands_on_an_unreachable_object_store_say_so_in_one_line(monkeypatch, tmp_path):
    """`score` said it in one line; `scores summarize` / `extract` printed a 49-line traceback."""
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for name, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_REGION": "us-east-1",
                        "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    out = "s3://unreachable-bucket-qa/scores"
    r = _invoke("scores", "summarize", out)
    _one_line_error(r, f"cannot read the scores at {out}:", "Could not connect", "AWS_ENDPOINT_URL")
    r = _invoke("scores", "extract", out, "--out", str(tmp_path / "x"))
    _one_line_error(r, f"cannot read the scores at {out}:", "Could not connect")


def test_score_says_it_is_waiting_on_a_store_that_does_not_answer(monkeypatch, tmp_path, tiny_artifact, synth_archive):
    """An endpoint that accepts connections and never answers: the run sat silent until its checks gave up (2 min on
    gs://); now it says after SLOW_STORE_S what it waits on, for --input and for --out, then fails in one line."""
    import socket

    from raydefect.pipelines import score
    from raydefect.scoring import storage as sources

    monkeypatch.setattr(score, "SLOW_STORE_S", 1.0)
    monkeypatch.setattr(sources, "S3_ATTEMPTS", 1)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)  # accepts (the kernel queues the connections), never answers
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
        for name, value in {"AWS_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x"}.items():
            monkeypatch.setenv(name, value)
        sources._filesystem.cache_clear()
        try:
            hung = {"--input": ("s3://factory/archive", str(tmp_path / "out")), "--out": (str(synth_archive["out"]),
                    "s3://factory/scores")}  # fmt: skip
            for option, (input, out) in hung.items():
                r = _invoke("score", "--model", str(tiny_artifact), "--input", input, "--out", out)
                where = input if option == "--input" else out
                assert r.exit_code == 1, r.output
                lines = [line for line in r.output.splitlines() if line.strip()]
                assert lines[0] == (
                    f"{option} {where}: no answer yet after 1 s, still waiting (a store that never answers fails after"
                    " about 10 s; check the network, the endpoint and the credentials)"
                ), r.output
                assert len(lines) == 2 and lines[1].startswith("error: ") and where in lines[1], r.output
        finally:
            sources._filesystem.cache_clear()


@pytest.fixture(scope="module")
def scores_dir(tiny_artifact, synth_archive, tmp_path_factory):
    """A scores folder written with the core scorer and the commit protocol (no Ray)."""
    out = tmp_path_factory.mktemp("cli") / "scores"
    meta = read_artifact_meta(tiny_artifact)
    files = sorted(str(p) for p in Path(synth_archive["out"]).rglob("*") if p.is_file())
    table = BatchScorer(str(tiny_artifact), run_id="20250101T013000Z-abcdef", device="cpu").score(files)
    store = ScoreStore(str(out))
    store.open()
    rec = RunRecord("20250101T013000Z-abcdef", meta.model_id, "stat", state="finished")
    md = file_metadata(meta, rec.run_id, "stat")
    staged = StagedFile.from_row(write_staged(table, store.staging(rec.run_id), Storage(), md, "stat"))
    store.commit(rec, [staged], KeySet())
    return out


def test_scores_summarize_and_extract_commands(scores_dir, tmp_path):
    r = _invoke("scores", "summarize", str(scores_dir), "--top", "3")
    assert r.exit_code == 0, r.output
    assert "40 images" in r.output and "3 errors" in r.output
    for heading in ("runs", "folders (20 of 21)", "top-scoring images", "20250101T013000Z-abcdef"):
        assert heading in r.output
    r = _invoke("scores", "extract", str(scores_dir), "--out", str(tmp_path / "x"), "--where", "defect_score>=0",
                "--top", "2")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "wrote 2 mask(s) and 2 overlay(s)" in r.output
    assert len(list((tmp_path / "x").glob("*_mask.png"))) == 2 and (tmp_path / "x" / "index.csv").exists()
    # again into the same folder: the first extract's PNGs go (the folder holds what index.csv lists)
    r = _invoke("scores", "extract", str(scores_dir), "--out", str(tmp_path / "x"), "--top", "1")
    assert r.exit_code == 0 and "removed the 4 PNG(s) of the previous extract" in r.output, r.output
    assert len(list((tmp_path / "x").glob("*.png"))) == 2
    r = _invoke("scores", "extract", str(scores_dir), "--out", str(tmp_path / "x"), "--where", "defect_class=nosuch")
    assert r.exit_code == 0 and "no scored image matched defect_class=nosuch" in r.output, r.output
    help_text = " ".join(_invoke("scores", "extract", "--help").output.split())
    assert all(c in help_text for c in WHERE_COLUMNS if c != "error") and "OP: = == != > >= < <=" in help_text
    errored = next(r for r in read_scores(str(scores_dir)).to_pylist() if r["error"])
    r = _invoke("scores", "extract", str(scores_dir), "--out", str(tmp_path / "z"), "--paths", errored["path"],
                "--paths", str(tmp_path / "never.png"))  # fmt: skip
    assert r.exit_code == 0 and f"{errored['path']}: scored with an error: {errored['error']}" in r.output, r.output
    assert f"{tmp_path / 'never.png'}: not in the scores" in r.output
    r = _invoke("scores", "summarize", str(scores_dir), "--model", "nope")
    _one_line_error(r, "--model nope: no such model here")
    r = _invoke("scores", "summarize", str(tmp_path))
    _one_line_error(r, "no raydefect scores here")
    r = _invoke("scores", "extract", str(scores_dir), "--out", str(tmp_path / "y"), "--where", "colour=red")
    _one_line_error(r, "unknown or non-scalar column 'colour'")


def _load_job_module():
    spec = importlib.util.spec_from_file_location("nightly_score", ROOT / "jobs" / "nightly_score.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kuberay_manifest_parses_and_runs_the_nightly_entry_point():
    docs = list(yaml.safe_load_all((ROOT / "jobs" / "kuberay-nightly.yaml").read_text()))
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"RayJob", "CronJob"} and kinds["RayJob"]["apiVersion"] == "ray.io/v1"
    job = kinds["RayJob"]["spec"]
    assert job["shutdownAfterJobFinishes"] is True and job["rayClusterSpec"]["workerGroupSpecs"]
    parser = _load_job_module().build_parser()
    entry = shlex.split(job["entrypoint"])
    assert entry[:2] == ["python", "/app/jobs/nightly_score.py"]
    args = parser.parse_args(entry[2:])
    assert args.input.startswith("s3://") and args.out.startswith("s3://")
    cron = kinds["CronJob"]["spec"]
    assert cron["concurrencyPolicy"] == "Forbid"
    command = cron["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"]
    i = command.index("--")
    assert command[:3] == ["ray", "job", "submit"] and command[i + 1 : i + 3] == ["python", "nightly_score.py"]
    parser.parse_args(command[i + 3 :])
    env = {e["name"]: e for e in cron["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"  # Ray 2.60 clusters refuse a submission without the token
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"]
    assert "/tmp" not in job["entrypoint"]  # nothing written where the deleted head pod takes it along
    secrets = yaml.safe_dump(docs).lower()
    assert "secret_access_key:" not in secrets and "password" not in secrets  # credentials only via secretRef
    cron_line = [ln for ln in (ROOT / "jobs" / "cron.example").read_text().splitlines() if ln and ln[0].isdigit()]
    assert len(cron_line) == 1 and "jobs/nightly_score.py" in cron_line[0] and len(cron_line[0].split()) > 6


def test_nightly_entry_point_reports_user_errors_with_exit_1(tmp_path, capsys):
    code = _load_job_module().main(["--model", str(tmp_path / "none"), "--input", str(tmp_path), "--out", "o"])
    assert code == 1
    assert capsys.readouterr().err.startswith("error: model artifact not found")
    argv = ["--model", str(tmp_path / "none"), "--input", str(tmp_path), "--out", str(tmp_path / "o")]
    assert _load_job_module().main([*argv, "--summary-json", str(tmp_path / "gone" / "x.json")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --summary-json") and "does not exist" in err and len(err.splitlines()) == 1


def test_ray_data_warnings_a_user_cannot_act_on_are_hidden_unless_verbose():
    """A nightly delta with fewer model batches than replicas made Ray Data warn about idle actors at every run."""
    import warnings

    from raydefect import console
    from raydefect.pipelines.cluster import quiet_ray_data

    idle = "The minimum number of concurrent actors for 'MapBatches(_ModelActor)' is set to 2, but the operator only "
    assert console.verbosity() == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_ray_data()
        caught.clear()  # importing Ray Data may warn about its own settings
        warnings.warn(idle + "received 1 input(s).", UserWarning, stacklevel=1)
        few = "The maximum number of concurrent tasks for 'MapBatches(_list_part)' is set to 2, but the operator "
        warnings.warn(few + "only received 1 input(s).", UserWarning, stacklevel=1)
        warnings.warn("some other warning", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["some other warning"]
