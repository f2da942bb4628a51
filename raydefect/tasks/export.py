"""`raydefect export`: a model artifact -> one ONNX or TorchScript file with a dynamic batch size, checked for parity.

The exported graph is `Predictor.predict` without Python around it::

    input   image         float32 [N, 3, S, S]   RGB, per the model's geometry (a square, a letterbox or a tile),
                                                 (x / 255 - mean) / std
    output  defect_score  float32 [N]            1 - p(normal)
            class_probs   float32 [N, C]         softmax over class_names (index 0 = normal)
            mask_prob     float32 [N, S, S]      sigmoid of the mask logits at the model's input size
            pixel_class_probs  float32 [N, C, S, S]   ``model.mask_classes`` only: softmax over the classes per pixel

Preprocessing and decision rules are not in the graph; they are written beside it in ``<file>.json`` (the
sidecar: image size, mean/std, the geometry -- for tiles the tiling, the stitching weights and the aggregation --,
class names, thresholds, output names, how to decide, and for per-pixel classes how to get each pixel's class), so
any runtime can use it. A tiles model's parity check also
runs one multi-tile image through raydefect's own stitching and through the file fed the same tiles.

After writing, the same inputs run through PyTorch and the exported file at batch 1 and at a batch larger than the
one used for tracing (so a batch size baked into the graph is caught); the largest absolute difference per output
must stay within `tolerance`, else the file is removed and `ExportError` says by how much it missed. With per-pixel
classes the class ids (`postprocess.class_ids`) of both must agree too, except where a pixel is within the tolerance
of a tie. ONNX parity
needs ONNX Runtime (the ``onnx`` extra): with ``check=None`` a missing runtime leaves the file unchecked with a
warning, ``check=True`` refuses to export without it, ``check=False`` skips the check.

ONNX uses ``torch.onnx.export(dynamo=True)`` (torch.export, the supported exporter) by default, or the older
TorchScript-based exporter with ``legacy=True`` (faster, a fallback for graphs torch.export cannot capture).
TorchScript uses ``torch.jit.trace`` (deprecated by PyTorch in favour of torch.export, but still what C++ and
older serving stacks load).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from raydefect import __version__, console
from raydefect.errors import ExportError, OutputError
from raydefect.inference.graph import (
    DEFAULT_TOLERANCE,
    INPUT_NAME,
    ONNX_INSTALL,
    PIXEL_CLASS_OUTPUT,
    export_onnx,
    export_wrapper,
    has_pixel_classes,
    output_names,
    parity_inputs,
    quiet_export,
    reference_outputs,
    short_error,
)
from raydefect.paths import write_bytes_atomic
from raydefect.tasks.contract import preprocessing_contract

if TYPE_CHECKING:
    import torch

    from raydefect.models.artifact import ArtifactMeta, LoadedModel

FORMATS = ("onnx", "torchscript")


def sidecar_path(path: str | Path) -> Path:
    """``model.onnx`` -> ``model.onnx.json``."""
    p = Path(path)
    return p.with_name(p.name + ".json")


def default_format(path: str | Path) -> str | None:
    suffix = Path(path).suffix.lower()
    return {".onnx": "onnx", ".pt": "torchscript", ".ts": "torchscript", ".torchscript": "torchscript"}.get(suffix)


def onnx_available() -> tuple[bool, bool]:
    """(can export: onnx + onnxscript import, can check: onnxruntime imports)."""
    import importlib

    def has(name: str) -> bool:
        try:
            importlib.import_module(name)
        except ImportError:
            return False
        return True

    return has("onnx") and has("onnxscript"), has("onnxruntime")


def _export_torchscript(wrapper: Any, example: torch.Tensor, path: Path) -> None:
    import torch

    with torch.no_grad():
        traced = torch.jit.trace(wrapper, (example,), check_trace=False)
    # into memory, then a Python write: TorchScript's C++ file writer aborts the whole process on a full disk
    # (an uncatchable C++ exception) and leaves half a file
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    write_bytes_atomic(path, buffer.getvalue())


class _Runner:
    """Runs an exported file: ``run(float32 [N, 3, S, S]) -> {output name: numpy}``."""

    def __init__(self, path: Path, fmt: str, outputs: tuple[str, ...]) -> None:
        self.fmt, self.outputs = fmt, outputs
        if fmt == "onnx":
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.log_severity_level = 3
            try:
                self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types
                raise ExportError(
                    f"{path}: ONNX Runtime cannot load it ({type(e).__name__}: {short_error(e)}); the file is corrupt "
                    "or not an ONNX model, export it again"
                ) from None
            names = [o.name for o in self.session.get_outputs()]
            if [i.name for i in self.session.get_inputs()] != [INPUT_NAME] or names != list(outputs):
                raise ExportError(
                    f"{path}: inputs/outputs are {[i.name for i in self.session.get_inputs()]} -> {names}, expected "
                    f"[{INPUT_NAME}] -> {list(outputs)}; it was not written by raydefect export for this model"
                )
        else:
            import torch

            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    self.module = torch.jit.load(str(path), map_location="cpu").eval()
            except Exception as e:  # RuntimeError / zip errors for a damaged archive
                raise ExportError(
                    f"{path}: torch.jit.load cannot load it ({type(e).__name__}: {short_error(e)}); the file is "
                    "corrupt or not TorchScript, export it again"
                ) from None

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        if self.fmt == "onnx":
            outs = self.session.run(None, {INPUT_NAME: x})
        else:
            import torch

            with torch.inference_mode():
                outs = [t.numpy() for t in self.module(torch.from_numpy(x))]
        if len(outs) != len(self.outputs):
            raise ExportError(f"the file gives {len(outs)} outputs, the model {len(self.outputs)}; export it again")
        return dict(zip(self.outputs, outs, strict=True))


def check_parity(
    model: str | Path | LoadedModel,
    path: str | Path,
    fmt: str | None = None,
    *,
    batch_sizes: Sequence[int] = (1, 3),
    tolerance: float = DEFAULT_TOLERANCE,
) -> dict[str, dict[str, float]]:
    """Run the same inputs through the artifact (PyTorch) and the exported file; raise `ExportError` past tolerance.

    Returns {"batch_<n>": {output: largest absolute difference}}. The batch-1 input is the first image of every
    larger batch, so a row's result must not depend on the batch around it either. With per-pixel classes also
    ``"class_ids"``: the pixels compared and how many got another class id (`class_id_parity`).
    """
    from raydefect.models.artifact import LoadedModel, load_artifact

    path = Path(path)
    fmt = fmt or default_format(path)
    if fmt not in FORMATS:
        raise ExportError(f"{path}: cannot tell the format from the name; pass --format {' or '.join(FORMATS)}")
    if not path.is_file():
        raise ExportError(f"{path}: no such file; export it first with `raydefect export --out {path}`")
    loaded = model if isinstance(model, LoadedModel) else load_artifact(model, device="cpu")
    reference = export_wrapper(loaded.model.to("cpu").eval())
    outputs = output_names(loaded.meta)
    runner = _Runner(path, fmt, outputs)
    inputs = parity_inputs(loaded.meta, max(batch_sizes))
    diffs: dict[str, dict[str, float]] = {}
    for n in batch_sizes:
        x = inputs[:n]
        want = reference_outputs(reference, x)
        try:
            got = runner.run(x)
        except ExportError:
            raise
        except Exception as e:
            raise ExportError(
                f"{path}: running it on a batch of {n} failed ({type(e).__name__}: {short_error(e)}); export it again"
            ) from None
        diffs[f"batch_{n}"] = {}
        for name in outputs:
            if got[name].shape != want[name].shape:
                raise ExportError(
                    f"{path}: output {name} has shape {tuple(got[name].shape)} for a batch of {n}, PyTorch gives "
                    f"{tuple(want[name].shape)}; the batch size is not dynamic, export it again"
                )
            diffs[f"batch_{n}"][name] = float(np.abs(got[name].astype(np.float64) - want[name]).max())
    if loaded.meta.geometry.tiled:
        diffs["stitched"] = _stitched_parity(loaded, runner)
    worst = max(((d, b, o) for b, per in diffs.items() for o, d in per.items()), default=(0.0, "", ""))
    if not worst[0] <= tolerance:  # also catches NaN
        raise ExportError(
            f"{path}: the exported model differs from PyTorch by {worst[0]:.3g} on {worst[2]} ({worst[1]}), more "
            f"than the tolerance {tolerance:g}; the file is corrupt or the export is wrong (export it again, try "
            "--legacy-exporter for ONNX, or raise --tolerance if the gap is expected)"
        )
    if has_pixel_classes(loaded.meta):
        x = inputs[: max(batch_sizes)]
        diffs["class_ids"] = class_id_parity(loaded.meta, reference_outputs(reference, x), runner.run(x), tolerance)
        if diffs["class_ids"]["unexplained"]:
            raise ExportError(
                f"{path}: {diffs['class_ids']['unexplained']} pixel(s) get another class id from the exported model "
                "than from PyTorch, away from any tie; export it again"
            )
    return diffs


def class_id_parity(
    meta: ArtifactMeta, want: dict[str, np.ndarray], got: dict[str, np.ndarray], tolerance: float
) -> dict[str, int]:
    """The class ids (`postprocess.class_ids` at the input size) of PyTorch's outputs and the file's: pixels compared,
    pixels whose id differs, and of those the ones no tie explains (the mask probability or the two most probable
    classes within 2 x `tolerance` of each other)."""
    from raydefect.inference import class_ids

    s, t = meta.image_size, meta.pixel_threshold
    pixels = differing = unexplained = 0
    for k in range(len(want["mask_prob"])):
        a = class_ids(want["mask_prob"][k], want[PIXEL_CLASS_OUTPUT][k], s, s, t, meta.geometry.mode)
        b = class_ids(got["mask_prob"][k], got[PIXEL_CLASS_OUTPUT][k], s, s, t, meta.geometry.mode)
        top2 = np.sort(want[PIXEL_CLASS_OUTPUT][k][1:], axis=0)[-2:] if meta.num_classes > 2 else None
        near = np.abs(want["mask_prob"][k] - t) <= 2 * tolerance
        if top2 is not None:
            near |= top2[1] - top2[0] <= 2 * tolerance
        off = a != b
        pixels += a.size
        differing += int(off.sum())
        unexplained += int((off & ~near).sum())
    return {"pixels": pixels, "differing": differing, "unexplained": unexplained}


def _stitched_parity(loaded: LoadedModel, runner: _Runner) -> dict[str, float]:
    """A tiles model: one multi-tile image through raydefect's own tiling and stitching (PyTorch) and through the
    exported file fed the same tiles; the largest absolute difference of the image's score, classes and mask."""
    from raydefect.geometry import predict_tiled
    from raydefect.inference import Predictor, Preprocessor, infer_images

    g = loaded.meta.geometry
    side = max(1, round(g.image_size / g.scale))
    rng = np.random.default_rng(3)
    image = rng.integers(0, 255, (int(side * 1.7), int(side * 2.5), 3), dtype=np.uint8)
    want = infer_images(Predictor(loaded, device="cpu", precision="fp32"), [image])
    got = predict_tiled([image], g, Preprocessor(loaded.meta).normalize_tiles, runner.run)[0]
    return {
        "defect_score": float(abs(got.defect_score - float(want["defect_score"][0]))),
        "class_probs": float(np.abs(got.class_probs - want["class_probs"][0]).max()),
        "mask_prob": float(np.abs(got.mask_prob - want["mask_prob"][0]).max()),
    }


@dataclass
class ExportReport:
    path: Path
    sidecar: Path
    format: str
    checked: bool
    parity: dict[str, dict[str, float]] = field(default_factory=dict)
    reason_unchecked: str = ""
    seconds: float = 0.0
    size_bytes: int = 0
    extra_files: list[Path] = field(default_factory=list)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def export_model(
    model: str | Path,
    out: str | Path,
    fmt: str | None = None,
    *,
    opset: int | None = None,
    batch: int = 2,
    check: bool | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    legacy: bool = False,
) -> ExportReport:
    """Export the artifact at `model` to `out` (+ the ``.json`` sidecar) and check parity; see the module docstring.

    batch: the example batch used for tracing; parity runs at batch 1 and ``batch + 1``.
    """
    import torch

    from raydefect.models.artifact import load_artifact, resolve_artifact_dir

    start = time.perf_counter()
    out = Path(out)
    fmt, can_check = _check_request(out, fmt or default_format(out), batch, opset, legacy, check)
    folder = resolve_artifact_dir(model)
    loaded = load_artifact(folder, device="cpu")
    meta = loaded.meta
    wrapper = export_wrapper(loaded.model.to("cpu").eval())
    example = torch.from_numpy(parity_inputs(meta, batch, seed=1))
    _write_model(wrapper, example, out, fmt, opset, legacy, meta)
    report = ExportReport(path=out, sidecar=sidecar_path(out), format=fmt, checked=False)
    data_file = out.with_name(out.name + ".data")
    if data_file.exists():
        report.extra_files.append(data_file)
    if check is False:
        report.reason_unchecked = "--no-check"
    elif not can_check:
        report.reason_unchecked = f"ONNX Runtime is not installed ({ONNX_INSTALL})"
        console.warn(f"parity NOT checked: ONNX Runtime is not installed; {ONNX_INSTALL}")
    else:
        try:
            report.parity = check_parity(loaded, out, fmt, batch_sizes=(1, batch + 1), tolerance=tolerance)
        except ExportError:
            _remove(out)
            raise
        report.checked = True
    _write_sidecar(report, meta, folder, legacy, tolerance)
    report.size_bytes = out.stat().st_size + sum(p.stat().st_size for p in report.extra_files)
    report.seconds = time.perf_counter() - start
    return report


def _check_request(
    out: Path, fmt: str | None, batch: int, opset: int | None, legacy: bool, check: bool | None
) -> tuple[str, bool]:
    """(the format, whether parity can be checked); every refusal before any work, naming the option to fix."""
    if fmt not in FORMATS:
        raise ExportError(f"--out {out}: cannot tell the format from the name; pass --format {' or '.join(FORMATS)}")
    if batch < 1:
        raise ExportError(f"--batch {batch}: must be >= 1")
    if out.is_dir():
        raise OutputError(f"--out {out} is a folder; pass a file name such as {out / ('model.' + fmt[:4])}")
    if fmt == "torchscript" and (opset is not None or legacy):
        console.warn("--opset and --legacy-exporter apply to ONNX only; ignored for TorchScript")
    can_export, can_check = (True, True) if fmt == "torchscript" else onnx_available()
    if not can_export:
        raise ExportError(f"exporting to ONNX needs the onnx and onnxscript packages: {ONNX_INSTALL}")
    if check is True and not can_check:
        raise ExportError(f"--check needs ONNX Runtime to compare outputs: {ONNX_INSTALL}, or leave out --check")
    return fmt, can_check


def _write_model(
    wrapper: Any, example: torch.Tensor, out: Path, fmt: str, opset: int | None, legacy: bool, meta: ArtifactMeta
) -> None:
    """The exported file itself, replacing an earlier export; nothing is left behind when it fails."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create {out.parent}: {e.strerror or e}") from None
    for stale in (out, sidecar_path(out), out.with_name(out.name + ".data")):
        stale.unlink(missing_ok=True)
    console.info(f"exporting model {meta.model_id} ({meta.backbone}, {meta.image_size} px) to {fmt}: {out}")
    try:
        with quiet_export():
            if fmt == "onnx":
                export_onnx(wrapper, example, out, opset, legacy, output_names(meta))
            else:
                _export_torchscript(wrapper, example, out)
    except OSError as e:
        _remove(out)
        raise OutputError(f"cannot write {out}: {e.strerror or e}") from None
    except Exception as e:
        _remove(out)
        hint = "; try --legacy-exporter" if fmt == "onnx" and not legacy else ""
        raise ExportError(
            f"exporting {meta.backbone} to {fmt} failed ({type(e).__name__}: {short_error(e)}){hint}"
        ) from e


def _write_sidecar(report: ExportReport, meta: ArtifactMeta, folder: Path, legacy: bool, tolerance: float) -> None:
    """``<file>.json``: how to run the file (preprocessing, outputs, decisions) and how it was made and checked."""
    import torch

    out, fmt = report.path, report.format
    sidecar = {
        "format": fmt,
        "file": out.name,
        "sha256": _sha256(out),
        "external_data": [p.name for p in report.extra_files],
        "opset": _onnx_opset(out) if fmt == "onnx" else None,
        "exporter": ("torch.onnx legacy" if legacy else "torch.onnx dynamo") if fmt == "onnx" else "torch.jit.trace",
        "torch_version": torch.__version__,
        "raydefect_version": __version__,
        "model_id": meta.model_id,
        "model_folder": str(folder),
        "backbone": meta.backbone,
        "image_size": meta.image_size,
        "dynamic_batch": True,
        **preprocessing_contract(meta),
        "parity": {
            "checked": report.checked,
            "reason_unchecked": report.reason_unchecked or None,
            "tolerance": tolerance,
            "max_abs_diff": report.parity,
        },
    }
    try:
        write_bytes_atomic(report.sidecar, (json.dumps(sidecar, indent=2) + "\n").encode())
    except OSError as e:
        _remove(out)  # a model file without its contract is not a finished export
        raise OutputError(f"cannot write {report.sidecar}: {e.strerror or e}; {out} was removed") from None


def _onnx_opset(path: Path) -> int | None:
    try:
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
        return next((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    except Exception:  # informational only
        return None


def _remove(path: Path) -> None:
    for p in (path, path.with_name(path.name + ".data"), sidecar_path(path)):
        with contextlib.suppress(OSError):
            os.remove(p)
