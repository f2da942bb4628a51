"""The ONNX Runtime engine of bulk scoring (``score.engine``): `OnnxPredictor`, `Predictor`'s ``predict`` on the
graph `engine_file` exports once per model and torch version on each machine."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from raydefect.errors import ExportError
from raydefect.inference.graph import (
    DEFAULT_TOLERANCE,
    INPUT_NAME,
    check_batch,
    export_onnx,
    export_wrapper,
    has_pixel_classes,
    output_names,
    parity_inputs,
    quiet_export,
    reference_outputs,
    short_error,
)
from raydefect.paths import write_atomic

if TYPE_CHECKING:
    import torch

    from raydefect.models.artifact import ArtifactMeta, LoadedModel


#: Where `OnnxPredictor` keeps the graphs it exported, per node: ``<tmp>/raydefect-onnx/<model_id>-<torch>.onnx``
#: (``-classes`` before ``.onnx`` for a ``model.mask_classes`` graph).
ENGINE_CACHE = "raydefect-onnx"


def engine_path(meta: ArtifactMeta, cache_dir: str | Path | None = None) -> Path:
    """Where `engine_file` keeps the model's graph. The outputs are in the name, so a graph cached by a version that
    exported three outputs for a ``model.mask_classes`` model is never taken for the four-output one."""
    import tempfile

    import torch

    folder = Path(cache_dir) if cache_dir is not None else Path(tempfile.gettempdir()) / ENGINE_CACHE
    outputs = "-classes" if has_pixel_classes(meta) else ""
    return folder / f"{meta.model_id}-torch{torch.__version__.split('+')[0]}{outputs}.onnx"


def engine_file(loaded: LoadedModel, cache_dir: str | Path | None = None) -> Path:
    """The model as an ONNX graph for `OnnxPredictor`, exported once per model and torch version into
    ``cache_dir`` (default: a folder in the system temp dir) and reused by later actors and runs on that machine.

    Uses the TorchScript-based exporter: ~3 s for a ViT-S where torch.export takes ~26 s, and ONNX Runtime runs
    both graphs equally fast (measured). Concurrent exporters write their own temporary file and rename it.
    """
    import torch

    path = engine_path(loaded.meta, cache_dir)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = export_wrapper(loaded.model.to("cpu").eval())
    example = torch.from_numpy(parity_inputs(loaded.meta, 2))
    with quiet_export(), torch.no_grad():
        return write_atomic(path, lambda tmp: export_onnx(wrapper, example, tmp, None, True, output_names(loaded.meta)))


class OnnxPredictor:
    """`inference.Predictor` on ONNX Runtime (CPU): the same ``predict(float32 [N, 3, S, S]) -> dict`` on the graph
    `engine_file` exports, outputs within 1e-6 of PyTorch's (see `inference.resolve_engine` for what it gains). On
    construction the graph is checked against the PyTorch model on two inputs; a miss beyond ``tolerance`` raises
    `ExportError`.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        threads: int | None = None,
        cache_dir: str | Path | None = None,
        tolerance: float = DEFAULT_TOLERANCE,
    ) -> None:
        import onnxruntime as ort
        import torch

        self.meta = loaded.meta
        self.device = torch.device("cpu")
        self.precision, self.engine = "fp32", "onnx"
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        options.inter_op_num_threads = 1
        # ORT's pool threads spin while they wait for work by default: in a pipeline whose decode tasks share the
        # cores, that burns the CPU those tasks need (measured: 4.1 images per CPU-second with spinning vs 6.0 for
        # PyTorch in `benchmarks/score_throughput.py`)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        for attempt in range(2):
            path = engine_file(loaded, cache_dir)
            try:
                self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                names = tuple(o.name for o in self.session.get_outputs())
                if names != output_names(self.meta):
                    raise ExportError(f"outputs {list(names)}, expected {list(output_names(self.meta))}")
                break
            except Exception as e:  # a damaged cache file (a full disk, a killed copy): export it once more
                path.unlink(missing_ok=True)
                if attempt:
                    raise ExportError(
                        f"{path}: ONNX Runtime cannot load it ({type(e).__name__}: {short_error(e)})"
                    ) from None
        x = parity_inputs(self.meta, 2, seed=1)
        ours, theirs = self.predict(x), reference_outputs(export_wrapper(loaded.model.to("cpu").eval()), x)
        worst = max(float(np.max(np.abs(ours[k] - theirs[k]))) for k in output_names(self.meta))
        if worst > tolerance:
            raise ExportError(f"the ONNX graph of model {self.meta.model_id} differs from PyTorch by {worst:.2g}")

    @property
    def image_size(self) -> int:
        return self.meta.image_size

    def predict(self, batch: np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
        empty = check_batch(self.meta, batch)
        if empty is not None:
            return empty
        x = batch.numpy() if not isinstance(batch, np.ndarray) else batch
        outs = self.session.run(None, {INPUT_NAME: np.ascontiguousarray(x, np.float32)})
        return dict(zip(output_names(self.meta), outs, strict=True))
