"""Training checkpoints: everything needed to continue a run exactly, without unpickling code.

A checkpoint is a folder:

    model.safetensors   the DefectModel's weights (unwrapped from DDP)
    optimizer.pt        the optimiser state (tensors + plain numbers; read with ``torch.load(weights_only=True)``)
    state.json          epoch, stage, the LR scheduler's state, steps per epoch, early-stopping state, the metric
                        history (one dict per epoch), the resolved config and the class names

RNG: every epoch reseeds torch and draws augmentation from (seed, epoch, rank, position) RNGs, so a resumed run
needs no saved generator state to see the same random numbers as an uninterrupted one.
"""

from __future__ import annotations

import errno
import json
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raydefect import __version__
from raydefect.errors import ArtifactError
from raydefect.models.artifact import unwrap
from raydefect.paths import share_like_other_outputs, write_text_atomic

if TYPE_CHECKING:
    import torch
    from torch import nn

FORMAT = 1
WEIGHTS = "model.safetensors"
OPTIMIZER = "optimizer.pt"
STATE = "state.json"


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(v) for v in value]
    return value


def _none_to_nan(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (math.nan if v is None else v) for k, v in row.items()}


@dataclass
class TrainState:
    """The bookkeeping of a run, besides weights and optimiser (JSON-safe)."""

    epoch: int = 0  # last completed epoch (0: none)
    stage: int = 0  # stage of that epoch
    steps_per_epoch: int = 0
    scheduler: dict[str, Any] | None = None  # LambdaLR.state_dict() of the current stage
    best: float | None = None  # best value of schedule.metric so far
    best_epoch: int = 0
    bad_epochs: int = 0  # epochs since the best (early stopping)
    stopped: bool = False  # early stopping fired
    attempt: int = 1  # 1 for the run's first start, +1 for every resume from a checkpoint (crash retry or re-run)
    history: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        data = {"format": FORMAT, "raydefect_version": __version__, **asdict(self)}
        return json.dumps(_nan_to_none(data), indent=1, allow_nan=False)

    @classmethod
    def from_json(cls, text: str, source: str) -> TrainState:
        try:
            data = json.loads(text)
            if data.pop("format", None) != FORMAT:
                raise ValueError("unknown checkpoint format")
            data.pop("raydefect_version", None)
            state = cls(**data)
        except (ValueError, TypeError) as e:
            raise ArtifactError(f"{source}: not a raydefect training checkpoint ({e}); start a new run name") from None
        state.history = [_none_to_nan(row) for row in state.history]
        return state


def save_checkpoint(
    directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, state: TrainState
) -> Path:
    """Write the three files into ``directory`` (created); state.json last, so its presence marks completeness."""
    import torch
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().to("cpu").contiguous() for k, v in unwrap(model).state_dict().items()}
    try:
        save_file(weights, str(out / WEIGHTS), metadata={"format": "pt"})
        share_like_other_outputs(out / WEIGHTS)
        if optimizer is not None:
            torch.save(optimizer.state_dict(), out / OPTIMIZER)
    except OSError:
        raise
    except Exception as e:  # safetensors' and torch's writers do not raise OSError on a full disk
        if _disk_full(out, e):
            raise OSError(errno.ENOSPC, f"No space left on device writing the checkpoint {out} ({e})") from e
        raise
    write_text_atomic(out / STATE, state.to_json())
    return out


def _disk_full(directory: Path, error: BaseException) -> bool:
    text = str(error).lower()
    if "no space left" in text or "storagefull" in text or "quota" in text:
        return True
    try:
        return shutil.disk_usage(directory).free < 1 << 20
    except OSError:
        return False


def is_checkpoint(directory: str | Path) -> bool:
    d = Path(directory)
    return (d / STATE).is_file() and (d / WEIGHTS).is_file()


def read_state(directory: str | Path) -> TrainState:
    path = Path(directory) / STATE
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ArtifactError(f"{path}: cannot read the checkpoint state ({e.strerror}); start a new run name") from None
    return TrainState.from_json(text, str(path))


def load_weights(directory: str | Path, model: nn.Module) -> None:
    """Checkpoint weights -> ``model`` (strict)."""
    from safetensors.torch import load_file

    path = Path(directory) / WEIGHTS
    try:
        state = load_file(str(path), device="cpu")
        unwrap(model).load_state_dict(state, strict=True)
    except (OSError, RuntimeError, ValueError) as e:
        detail = " ".join(str(e).split())[:300]
        raise ArtifactError(
            f"{path}: cannot load the checkpoint weights ({detail}); the run's config changed the model or the file "
            "is damaged: start a new run name"
        ) from None


def load_optimizer_state(directory: str | Path) -> dict[str, Any] | None:
    """The optimiser state dict (``weights_only=True``: tensors and numbers only), or None if not saved."""
    import torch

    path = Path(directory) / OPTIMIZER
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def validate_checkpoint(directory: str | Path) -> TrainState:
    """Read every file of a checkpoint the way a resume will (state, all weights, optimiser); raises `ArtifactError`
    naming the damaged file. A resume validates before it trusts the newest checkpoint (a disk that filled up or a
    copy cut short leaves a folder that looks complete)."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(directory)
    state = read_state(d)
    weights = d / WEIGHTS
    try:
        load_file(str(weights), device="cpu")
    except (OSError, SafetensorError, RuntimeError, ValueError) as e:
        raise ArtifactError(f"{weights}: damaged checkpoint weights ({' '.join(str(e).split())[:200]})") from None
    optimizer = d / OPTIMIZER
    if optimizer.exists():
        try:
            torch.load(optimizer, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle/zip errors of a cut file have many types
            raise ArtifactError(f"{optimizer}: damaged optimiser state ({type(e).__name__}: {e})") from None
    return state
