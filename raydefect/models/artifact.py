"""The model artifact (contract 2 of docs/architecture.md): a folder that needs nothing else to run.

    model/
      model.safetensors   the whole DefectModel's weights (safetensors: tensors only, never pickled code)
      model.yaml          format version, raydefect version, model_id, backbone (name + timm name), image size,
                          normalisation (mean/std), model config (head config), class names, image and pixel
                          thresholds, validation metrics, weights sha256, created_at, extra, and (optional)
                          reference: fixed-bin histograms of the validation split's defect scores and of the
                          train/val images' statistics (`metrics.drift.Reference`): what `scores report` compares with

``model_id`` is a content hash: sha256 over the tensors' sha256 (`tensors_sha256`) and the yaml fields that change
predictions (architecture, image size, normalisation, class names, thresholds), first 16 hex digits. Metrics, dates,
extra and reference do not change it; a model.yaml without reference (older artifacts) loads with an empty one.
`save_artifact` writes into a temporary sibling folder and renames it into place, so readers never see a
half-written artifact. `load_artifact` builds the backbone with ``pretrained=False`` and loads the
safetensors; every way an artifact can be broken raises `ArtifactError` naming the folder and the fix.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from raydefect import __version__, console
from raydefect.config import ModelConfig
from raydefect.config import build_section as _build_section
from raydefect.errors import ArtifactError, OutputError, RaydefectError
from raydefect.geometry import Geometry
from raydefect.paths import share_like_other_outputs

if TYPE_CHECKING:
    from torch import nn

    from raydefect.models.model import DefectModel

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
#: Optional: the validation images' defect scores and labels the image threshold was chosen on (CSV: defect_score,
#: label), so that `raydefect thresholds` can move the operating point to a target recall without the data.
VALIDATION_SCORES_FILE = "validation_scores.csv"
META_FILE = "model.yaml"
# ModelConfig fields that only matter while training; they do not change predictions, so not the model id.
_TRAINING_ONLY = ("pretrained", "weights", "drop_path_rate", "dropout")
_REQUIRED = (
    "format_version",
    "model_id",
    "backbone",
    "image_size",
    "mean",
    "std",
    "model",
    "class_names",
    "thresholds",
    "weights_sha256",
)


def _plain(value: Any) -> Any:
    """numpy / torch scalars and tuples -> YAML-safe Python values."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return _plain(value.tolist())
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        return value.item()
    return value


def _check_thresholds(thresholds: Mapping[str, Any], source: str) -> dict[str, float]:
    out = {}
    for key in ("image", "pixel"):
        value = thresholds.get(key) if isinstance(thresholds, Mapping) else None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
            raise ArtifactError(f"{source}: thresholds.{key} must be a number in [0, 1], got {value!r}")
        out[key] = float(value)
    return out


def compute_model_id(weights_sha256: str, behaviour: Mapping[str, Any]) -> str:
    payload = weights_sha256 + "\n" + json.dumps(_plain(behaviour), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def tensors_sha256(state: Mapping[str, Any]) -> str:
    """sha256 over the tensors (name, dtype, shape, bytes) in name order.

    Hashing the tensors rather than the file keeps the id independent of how safetensors lays out its header
    (its metadata order is not deterministic), while still catching any changed, corrupt or swapped weight.
    """
    import torch

    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


@dataclass(frozen=True)
class ArtifactMeta:
    """Everything in model.yaml. Build with `from_dict` / `from_yaml`; `to_dict` is what gets written."""

    model_id: str
    backbone: str
    timm_name: str
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    model: ModelConfig
    class_names: tuple[str, ...]
    thresholds: Mapping[str, float]
    weights_sha256: str
    metrics: Mapping[str, Any] = field(default_factory=dict)
    created_at: str = ""
    raydefect_version: str = __version__
    format_version: int = FORMAT_VERSION
    extra: Mapping[str, Any] = field(default_factory=dict)
    geometry: Geometry = None  # type: ignore[assignment]  # None -> square at image_size (older model.yaml)
    reference: Mapping[str, Any] = field(default_factory=dict)  # the validation distribution; {} in older ones

    def __post_init__(self) -> None:
        if self.geometry is None:
            object.__setattr__(self, "geometry", Geometry("square", self.image_size))

    @property
    def image_threshold(self) -> float:
        return float(self.thresholds["image"])

    @property
    def pixel_threshold(self) -> float:
        return float(self.thresholds["pixel"])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def defect_classes(self) -> tuple[str, ...]:
        return self.class_names[1:]

    def behaviour(self) -> dict[str, Any]:
        """The fields that change predictions: hashed into the model id."""
        model = {k: v for k, v in dataclasses.asdict(self.model).items() if k not in _TRAINING_ONLY}
        if not model.get("mask_classes"):  # models without per-pixel classes keep the ids they had
            model.pop("mask_classes", None)
        return {
            "format_version": self.format_version,
            "backbone": self.backbone,
            "timm_name": self.timm_name,
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "model": model,
            "class_names": list(self.class_names),
            "thresholds": dict(self.thresholds),
            # square models keep the ids they had before geometries existed
            **({} if self.geometry.mode == "square" else {"geometry": self.geometry.to_dict()}),
        }

    def computed_model_id(self) -> str:
        return compute_model_id(self.weights_sha256, self.behaviour())

    def to_dict(self) -> dict[str, Any]:
        return _plain(
            {
                "format_version": self.format_version,
                "raydefect_version": self.raydefect_version,
                "model_id": self.model_id,
                "created_at": self.created_at,
                "backbone": self.backbone,
                "timm_name": self.timm_name,
                "image_size": self.image_size,
                "geometry": self.geometry.to_dict(),
                "mean": list(self.mean),
                "std": list(self.std),
                "model": dataclasses.asdict(self.model),
                "class_names": list(self.class_names),
                "thresholds": dict(self.thresholds),
                "metrics": dict(self.metrics),
                "weights_sha256": self.weights_sha256,
                "extra": dict(self.extra),
                **({"reference": dict(self.reference)} if self.reference else {}),
            }
        )

    @classmethod
    def from_dict(cls, data: Any, source: str = META_FILE) -> ArtifactMeta:
        fix = "re-export the model (a training run writes runs/<name>/model/)"
        if not isinstance(data, Mapping):
            raise ArtifactError(f"{source}: expected a mapping of fields, got {type(data).__name__}; {fix}")
        missing = [k for k in _REQUIRED if k not in data]
        if missing:
            raise ArtifactError(f"{source}: missing field(s) {', '.join(missing)}; {fix}")
        version = data["format_version"]
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ArtifactError(
                f"{source}: format_version {version!r} is newer than this raydefect ({__version__}) reads "
                f"(<= {FORMAT_VERSION}); upgrade raydefect"
            )
        try:
            model = _build_section("model", ModelConfig, data["model"], source)
            mean = tuple(float(v) for v in data["mean"])
            std = tuple(float(v) for v in data["std"])
            if len(mean) != 3 or len(std) != 3:
                raise ValueError("mean and std need 3 values")
            meta = cls(
                model_id=str(data["model_id"]),
                backbone=str(data["backbone"]),
                timm_name=str(data.get("timm_name", "")),
                image_size=int(data["image_size"]),
                mean=mean,  # type: ignore[arg-type]
                std=std,  # type: ignore[arg-type]
                model=model,
                class_names=tuple(str(c) for c in data["class_names"]),
                thresholds=_check_thresholds(data["thresholds"], source),
                weights_sha256=str(data["weights_sha256"]),
                metrics=dict(data.get("metrics") or {}),
                created_at=str(data.get("created_at", "")),
                raydefect_version=str(data.get("raydefect_version", "")),
                format_version=version,
                extra=dict(data.get("extra") or {}),
                geometry=Geometry.from_dict(data.get("geometry"), int(data["image_size"])),
                reference=dict(data.get("reference") or {}),
            )
        except ArtifactError:
            raise
        except (RaydefectError, TypeError, ValueError) as e:
            raise ArtifactError(f"{source}: invalid field ({e}); {fix}") from None
        return meta

    @classmethod
    def from_yaml(cls, path: str | Path) -> ArtifactMeta:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise ArtifactError(f"{path}: cannot read ({e.strerror})") from None
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ArtifactError(f"{path}: corrupt YAML ({getattr(e, 'problem', e)}); re-export the model") from None
        return cls.from_dict(data, source=str(path))


@dataclass(frozen=True)
class LoadedModel:
    """A ready-to-run model (eval mode, on its device) and its metadata."""

    model: DefectModel
    meta: ArtifactMeta


def unwrap(model: nn.Module) -> nn.Module:
    """DDP (``.module``) and torch.compile (``._orig_mod``) wrappers -> the DefectModel."""
    for _ in range(4):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            break
        model = inner
    return model


def resolve_artifact_dir(path: str | Path) -> Path:
    """The artifact folder, also when given its model.yaml or the run folder that holds ``model/``."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ArtifactError(
            f"model artifact not found: {p} (pass the model folder a training run wrote, e.g. runs/<name>/model)"
        )
    if p.is_file():
        if p.name in (META_FILE, WEIGHTS_FILE):
            return p.parent
        raise ArtifactError(f"{p} is a file; pass the model folder that holds {META_FILE} and {WEIGHTS_FILE}")
    if not (p / META_FILE).exists() and (p / "model" / META_FILE).exists():
        return p / "model"
    if not (p / META_FILE).exists():
        raise ArtifactError(
            f"{p}: no {META_FILE}, so this is not a raydefect model artifact (a training run writes one to "
            "runs/<name>/model); pass that folder"
        )
    return p


def read_artifact_meta(path: str | Path) -> ArtifactMeta:
    """model.yaml only: cheap (no weights), for drivers that need the model id and thresholds."""
    return ArtifactMeta.from_yaml(resolve_artifact_dir(path) / META_FILE)


def _check_model_matches(
    net: Any, model_cfg: ModelConfig | None, image_size: int | None, class_names: Sequence[str] | None
) -> None:
    """`save_artifact`'s optional arguments must agree with the model's own."""
    for name, given, actual in (
        ("model_cfg", model_cfg, net.model_cfg),
        ("image_size", image_size, net.image_size),
        ("class_names", None if class_names is None else tuple(class_names), net.class_names),
    ):
        if given is not None and given != actual:
            raise ValueError(f"save_artifact: {name}={given!r} does not match the model's {actual!r}")


def _new_meta(
    net: Any,
    thresholds: dict[str, float],
    state: Mapping[str, Any],
    metrics: Mapping[str, Any] | None,
    extra: Mapping[str, Any] | None,
    reference: Mapping[str, Any] | None,
) -> ArtifactMeta:
    """model.yaml's content for `net` with these weights (`state`), its `model_id` computed from them."""
    spec = net.spec
    meta = ArtifactMeta(
        model_id="",
        backbone=spec.name,
        timm_name=spec.timm_name,
        image_size=net.image_size,
        mean=tuple(spec.mean),  # type: ignore[arg-type]
        std=tuple(spec.std),  # type: ignore[arg-type]
        model=net.model_cfg,
        class_names=tuple(net.class_names),
        thresholds=thresholds,
        weights_sha256=tensors_sha256(state),
        metrics=_plain(dict(metrics or {})),
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        extra=_plain(dict(extra or {})),
        geometry=net.geometry,
        reference=_plain(dict(reference or {})),
    )
    return dataclasses.replace(meta, model_id=meta.computed_model_id())


def save_artifact(
    model: nn.Module,
    out_dir: str | Path,
    *,
    thresholds: Mapping[str, float],
    metrics: Mapping[str, Any] | None = None,
    model_cfg: ModelConfig | None = None,
    image_size: int | None = None,
    class_names: Sequence[str] | None = None,
    extra: Mapping[str, Any] | None = None,
    reference: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, bytes] | None = None,
) -> ArtifactMeta:
    """Write ``model.safetensors`` + ``model.yaml`` atomically into ``out_dir``; returns the metadata written.

    ``reference``: the validation distribution (`metrics.drift.Reference.to_dict`), stored as is.
    ``extra_files``: name -> bytes of optional files written beside them (e.g. `VALIDATION_SCORES_FILE`).
    ``model_cfg``, ``image_size`` and ``class_names`` default to the model's own and must agree with it if given.
    An existing artifact in ``out_dir`` is replaced; any other non-empty folder is refused.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    net: Any = unwrap(model)
    _check_model_matches(net, model_cfg, image_size, class_names)
    thresholds = _check_thresholds(thresholds, "save_artifact")
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or ((not (out / META_FILE).exists()) and any(out.iterdir()))):
        raise OutputError(f"{out} exists and is not a model artifact; refusing to overwrite it (choose another folder)")
    state = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
    tmp = folder_beside(out, "the model artifact")
    try:
        os.chmod(tmp, 0o755)
        weights_path = tmp / WEIGHTS_FILE
        save_file(state, str(weights_path), metadata={"format": "pt"})
        share_like_other_outputs(weights_path)
        meta = _new_meta(net, thresholds, state, metrics, extra, reference)
        with open(tmp / META_FILE, "w", encoding="utf-8") as f:
            yaml.safe_dump(meta.to_dict(), f, sort_keys=False)
            f.flush()
            os.fsync(f.fileno())
        with open(weights_path, "rb+") as f:
            os.fsync(f.fileno())
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        install_folder(tmp, out)
    except (OSError, SafetensorError) as e:  # safetensors reports a full disk as its own error type
        shutil.rmtree(tmp, ignore_errors=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else " ".join(str(e).split())
        raise OutputError(
            f"cannot write the model artifact to {out}: {reason}; free space or fix permissions"
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def folder_beside(out: Path, what: str) -> Path:
    """A new empty folder beside `out` to write `what` into, then `install_folder` it in the place of `out`."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise OutputError(f"cannot write {what} to {out}: {e.strerror}") from None


def install_folder(tmp: Path, out: Path) -> None:
    """Put the finished folder `tmp` in the place of `out` (a previous artifact there moved aside, then removed)."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def load_artifact(path: str | Path, device: str = "cpu", *, verify: bool = True) -> LoadedModel:
    """Rebuild the model from its folder alone (``pretrained=False`` + safetensors) in eval mode on ``device``.

    ``verify`` checks the tensors' sha256 against model.yaml (catches corrupt or swapped weights). If model.yaml was
    edited by hand (e.g. a threshold), the model id is recomputed so it always describes what runs.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from raydefect.models.model import DefectModel
    from raydefect.models.registry import resolve_backbone

    folder = resolve_artifact_dir(path)
    meta = ArtifactMeta.from_yaml(folder / META_FILE)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise ArtifactError(f"{folder}: {WEIGHTS_FILE} is missing, the artifact is incomplete; re-export the model")
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(
            f"{weights}: unreadable ({e}); the file is truncated or corrupt, re-copy or re-export it"
        ) from None
    if verify and tensors_sha256(state) != meta.weights_sha256:
        raise ArtifactError(
            f"{weights}: content does not match weights_sha256 in {META_FILE} (file corrupt or replaced); "
            "re-export or re-copy the model folder"
        )
    cfg = dataclasses.replace(meta.model, pretrained=False, weights=None)
    try:
        registered = resolve_backbone(meta.backbone).timm_name
    except RaydefectError as e:
        raise ArtifactError(f"{folder}: {META_FILE} names an unknown backbone ({e})") from None
    if meta.timm_name and meta.timm_name != registered:
        raise ArtifactError(
            f"{folder}: {META_FILE} was saved with backbone {meta.backbone} = timm {meta.timm_name}, but this "
            f"raydefect maps {meta.backbone} to {registered}; use the raydefect version that trained it "
            f"({meta.raydefect_version})"
        )
    try:
        net = DefectModel(cfg, meta.image_size, meta.class_names, load_weights=False, geometry=meta.geometry)
    except RaydefectError as e:
        raise ArtifactError(f"{folder}: cannot rebuild the model described in {META_FILE}: {e}") from None
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise ArtifactError(
            f"{weights}: weights do not match the architecture in {META_FILE} ({detail}); the two files come from "
            "different models, re-export the model folder"
        ) from None
    actual_id = meta.computed_model_id()
    if actual_id != meta.model_id:
        console.warn(
            f"{folder}: {META_FILE} was edited after saving; model id is now {actual_id} (was {meta.model_id})"
        )
        meta = dataclasses.replace(meta, model_id=actual_id)
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    net.to(device).eval()
    return LoadedModel(net, meta)
