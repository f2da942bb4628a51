"""Where and how a model runs: the device, the precision and the engine (PyTorch or ONNX Runtime).

Nothing heavy is imported at module level: the score driver resolves these before any model is loaded.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

from raydefect.errors import ConfigError
from raydefect.inference.graph import ONNX_INSTALL

if TYPE_CHECKING:
    import torch


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """A torch.device as given, or from its name; ``auto``: CUDA when present, else the CPU."""
    import torch

    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (the AVX512-BF16 or AMX-BF16 instructions of recent Xeon and EPYC
    CPUs), read from /proc/cpuinfo (other systems: False). Only there is bf16 worth it on a CPU: elsewhere PyTorch
    emulates it, slower than fp32. Measured on a 2-core AMD EPYC with AVX512-BF16 (ViT-S/16, 224 px, two threads):
    bf16 autocast 52-59 images/s against fp32's 19-21."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


PRECISIONS = ("auto", "bf16", "fp32")


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """Bulk scoring's precision (score.precision), 'bf16' or 'fp32'. ``auto``: bf16 autocast on GPUs and on CPUs that
    compute bf16 in hardware (`cpu_has_native_bf16`), fp32 elsewhere. ``device`` is a torch.device or its type;
    nothing heavy is imported. (`Predictor`'s own ``auto``, for predict and evaluate, keeps fp32 on every CPU: there
    its numbers must match the ones training validated, in fp32 on a CPU.)"""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    kind = str(getattr(device, "type", device))
    return "bf16" if kind == "cuda" or (kind == "cpu" and cpu_has_native_bf16()) else "fp32"


ENGINES = ("auto", "torch", "onnx")


def resolve_engine(engine: str, device: str | torch.device, precision: str = "auto") -> str:
    """'torch' or 'onnx' (ONNX Runtime, CPU only, fp32). ``auto``: ONNX Runtime where the model runs in fp32 on a CPU
    (`resolve_precision`) and it is installed (the ``onnx`` extra), PyTorch otherwise (GPUs and CPUs with native
    bf16: bf16 autocast). An explicit 'onnx' with precision 'auto' runs in fp32. ``device`` is a torch.device or its
    type ("cpu", "cuda"); nothing heavy is imported here (the score driver calls it).

    Measured on the 2-core development CPU (ViT-S/16, 224 px, batch 16): ONNX Runtime 10.7-11.3 images/s against
    PyTorch eager 9.2-10.9 in the same runs, and no gain inside the score pipeline; hence PyTorch is the default."""
    from importlib.util import find_spec

    if engine not in ENGINES:
        raise ConfigError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    kind = str(getattr(device, "type", device))
    if engine == "onnx" and not (kind == "cpu" and precision in ("auto", "fp32")):
        raise ConfigError(
            f"engine 'onnx' runs on CPU in fp32 only (here: {kind}, precision {precision}); use engine 'torch'"
        )
    available = all(find_spec(m) is not None for m in ("onnx", "onnxscript", "onnxruntime"))
    if engine == "onnx" and not available:
        raise ConfigError(f"engine 'onnx' needs ONNX Runtime: {ONNX_INSTALL}; or use engine 'torch'")
    if engine == "auto":
        return "onnx" if kind == "cpu" and resolve_precision(precision, kind) == "fp32" and available else "torch"
    return engine


def resolve_scoring(engine: str, device: str | torch.device, precision: str = "auto") -> tuple[str, str]:
    """What bulk scoring runs: (`resolve_engine`, the precision): ONNX Runtime in fp32, PyTorch in
    `resolve_precision`'s. Used by each model actor (`scoring.scorer.ModelStep`) and, for the run summary, by the
    score driver."""
    chosen = resolve_engine(engine, device, precision)
    return chosen, "fp32" if chosen == "onnx" else resolve_precision(precision, device)
