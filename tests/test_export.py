"""`raydefect export`: ONNX and TorchScript files that reproduce the PyTorch model at any batch size, the sidecar
contract, and clear failures for damaged files, parity misses and a missing ONNX Runtime."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from raydefect.cli import cli
from raydefect.inference import Predictor
from raydefect.inference.graph import OUTPUT_NAMES
from raydefect.tasks.export import (
    ExportError,
    check_parity,
    export_model,
    parity_inputs,
    sidecar_path,
)

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")


def _predictor_outputs(tiny_artifact, x: np.ndarray) -> dict[str, np.ndarray]:
    return Predictor(tiny_artifact, device="cpu", precision="fp32").predict(x)


@pytest.fixture(scope="module")
def torchscript_file(tiny_artifact, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "model.pt"
    return export_model(tiny_artifact, out, batch=2)


@pytest.fixture(scope="module")
def onnx_file(tiny_artifact, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "model.onnx"
    return export_model(tiny_artifact, out, batch=2)  # the default exporter: torch.onnx dynamo


def _check_contract(report, tiny_artifact) -> None:
    meta = Predictor(tiny_artifact, device="cpu").meta
    side = json.loads(sidecar_path(report.path).read_text())
    assert side["file"] == report.path.name and side["model_id"] == meta.model_id
    assert side["input"]["shape"] == ["batch", 3, 32, 32]
    assert side["input"]["mean"] == list(meta.mean) and side["input"]["std"] == list(meta.std)
    assert side["class_names"] == ["normal", "scratch", "spot"]
    assert side["thresholds"] == {"image": 0.5, "pixel": 0.5}
    assert [o["name"] for o in side["outputs"]] == list(OUTPUT_NAMES)
    assert side["parity"]["checked"] is True and set(side["parity"]["max_abs_diff"]) == {"batch_1", "batch_3"}


def _independent_run(report, tiny_artifact, n: int) -> dict[str, np.ndarray]:
    x = parity_inputs(Predictor(tiny_artifact, device="cpu").meta, n, seed=7)
    if report.format == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
        got = dict(zip(OUTPUT_NAMES, session.run(None, {"image": x}), strict=True))
    else:
        import torch

        module = torch.jit.load(str(report.path))
        with torch.inference_mode():
            got = {k: v.numpy() for k, v in zip(OUTPUT_NAMES, module(torch.from_numpy(x)), strict=True)}
    want = _predictor_outputs(tiny_artifact, x)
    return {k: np.abs(got[k] - want[k]).max() for k in OUTPUT_NAMES}


def test_torchscript_parity_at_batch_1_and_3(torchscript_file, tiny_artifact):
    report = torchscript_file
    assert report.checked and report.format == "torchscript" and report.path.is_file()
    assert set(report.parity) == {"batch_1", "batch_3"}
    assert max(max(d.values()) for d in report.parity.values()) <= 1e-5
    _check_contract(report, tiny_artifact)
    for n in (1, 3, 5):  # batch sizes other than the traced one (2)
        assert max(_independent_run(report, tiny_artifact, n).values()) <= 1e-5


@pytest.mark.slow
def test_onnx_parity_at_batch_1_and_3(onnx_file, tiny_artifact):
    report = onnx_file
    assert report.checked and report.format == "onnx" and report.extra_files == []  # small model: one file
    assert max(max(d.values()) for d in report.parity.values()) <= 1e-4
    _check_contract(report, tiny_artifact)
    side = json.loads(sidecar_path(report.path).read_text())
    assert side["exporter"] == "torch.onnx dynamo" and side["opset"] >= 17
    for n in (1, 3, 5):
        assert max(_independent_run(report, tiny_artifact, n).values()) <= 1e-4


@pytest.mark.slow
def test_tampered_onnx_fails_parity_or_loading(onnx_file, tiny_artifact, tmp_path):
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_file.path))
    biggest = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    weights = numpy_helper.to_array(biggest).copy()
    # noise, not a constant (LayerNorm would cancel a shift of every channel): still valid, no longer this model
    weights += np.random.default_rng(0).normal(0, 0.5, weights.shape).astype(weights.dtype)
    biggest.CopyFrom(numpy_helper.from_array(weights, biggest.name))
    tampered = tmp_path / "tampered.onnx"
    onnx.save(model, str(tampered))
    with pytest.raises(ExportError, match=r"differs from PyTorch by .* more than the tolerance"):
        check_parity(tiny_artifact, tampered)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(onnx_file.path.read_bytes()[:5000])
    with pytest.raises(ExportError, match="ONNX Runtime cannot load it.*export it again"):
        check_parity(tiny_artifact, truncated)


def test_tampered_torchscript_fails_parity_or_loading(torchscript_file, tiny_artifact, tmp_path):
    import torch

    module = torch.jit.load(str(torchscript_file.path))
    with torch.no_grad():
        next(iter(module.parameters())).mul_(3.0)
    tampered = tmp_path / "tampered.pt"
    module.save(str(tampered))
    with pytest.raises(ExportError, match="differs from PyTorch"):
        check_parity(tiny_artifact, tampered)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(torchscript_file.path.read_bytes()[:3000])
    with pytest.raises(ExportError, match="torch.jit.load cannot load it"):
        check_parity(tiny_artifact, truncated)
    with pytest.raises(ExportError, match="no such file"):
        check_parity(tiny_artifact, tmp_path / "missing.pt")


def test_a_parity_miss_removes_the_file(tiny_artifact, tmp_path):
    out = tmp_path / "strict.onnx"
    with pytest.raises(ExportError, match="more than the tolerance 1e-15"):
        export_model(tiny_artifact, out, legacy=True, tolerance=1e-15)  # ONNX Runtime is never bit-exact
    assert not out.exists() and not sidecar_path(out).exists()


def test_without_onnx_runtime(tiny_artifact, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    required = tmp_path / "required.onnx"
    with pytest.raises(ExportError, match=r"--check needs ONNX Runtime.*raydefect\[onnx\]"):
        export_model(tiny_artifact, required, check=True)
    assert not required.exists()
    out = tmp_path / "unchecked.onnx"
    report = export_model(tiny_artifact, out, legacy=True)  # default: write it, say it was not checked
    assert out.is_file() and not report.checked and "raydefect[onnx]" in report.reason_unchecked
    side = json.loads(sidecar_path(out).read_text())
    assert side["parity"]["checked"] is False and side["exporter"] == "torch.onnx legacy"
    monkeypatch.delitem(sys.modules, "onnxruntime")
    assert max(max(d.values()) for d in check_parity(tiny_artifact, out).values()) <= 1e-4  # and it is right


def test_cli_export(tiny_artifact, tmp_path):
    out = tmp_path / "m.ts"
    result = CliRunner().invoke(cli, ["export", "--model", str(tiny_artifact), "--out", str(out), "--batch", "3"])
    assert result.exit_code == 0, result.output
    assert "parity within 0.0001" in result.output and "batch" in result.output
    side = json.loads(sidecar_path(out).read_text())
    assert side["format"] == "torchscript" and set(side["parity"]["max_abs_diff"]) == {"batch_1", "batch_4"}
    unknown = CliRunner().invoke(cli, ["export", "--model", str(tiny_artifact), "--out", str(tmp_path / "m.bin")])
    assert unknown.exit_code == 1 and "--format onnx or torchscript" in unknown.output
    folder = CliRunner().invoke(
        cli, ["export", "--model", str(tiny_artifact), "--out", str(tmp_path), "--format", "onnx"]
    )
    assert folder.exit_code in (1, 2) and "Traceback" not in folder.output
    shutil.rmtree(tmp_path / "none", ignore_errors=True)
    missing = CliRunner().invoke(cli, ["export", "--model", str(tmp_path / "none"), "--out", str(out)])
    assert missing.exit_code == 1 and "model artifact not found" in missing.output


def test_cnn_exports_to_onnx_with_parity(tmp_path, make_tiny_model):
    from raydefect.models.artifact import save_artifact

    artifact = tmp_path / "model"
    save_artifact(make_tiny_model("test-tiny-cnn", image_size=64), artifact, thresholds={"image": 0.5, "pixel": 0.5})
    report = export_model(artifact, tmp_path / "cnn.onnx", batch=2)
    assert max(max(d.values()) for d in check_parity(artifact, report.path).values()) <= 1e-4
