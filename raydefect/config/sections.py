"""The configuration schema: eight frozen dataclass sections in one `Config`, and their validation from plain dicts.

Unknown keys are errors with a closest-match suggestion (`suggest`); cross-field checks live in ``__post_init__``
and name the key the user typed. Configs cross process boundaries (Ray) as plain dicts and are rebuilt -- and
re-validated -- with `Config.from_dict`. Each field carries its documentation in ``metadata["help"]`` (see
`loader.describe`), litgpt-style.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from raydefect.config.fields import check as _check
from raydefect.config.fields import doc_field as _f
from raydefect.config.scoring import ResourcesConfig, ScoreConfig
from raydefect.errors import ConfigError, ModelError
from raydefect.models.registry import check_image_size, resolve_backbone

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class DataConfig:
    dataset: str | None = _f(None, "Prepared dataset folder (holds manifest.parquet and dataset.yaml).")
    image_size: int = _f(224, "Square side in pixels the model sees; a multiple of the backbone's patch size.")
    geometry: str = _f(
        "aspect",
        "How images become model inputs: 'aspect' (longer side to image_size, aspect kept, padded: nothing is "
        "distorted), 'square' (resized to image_size, aspect not kept) or 'tiles' (scaled by data.scale and cut into "
        "tile_size tiles: camera images with small defects).",
    )
    scale: float = _f(1.0, "Tiles: resize factor applied before tiling; 1.0 = the camera's native pixels.")
    tile_size: int = _f(512, "Tiles: side of a tile in pixels (the model's input); a multiple of the patch size.")
    tile_overlap: int = _f(64, "Tiles: pixels shared by neighbouring tiles; stitching fades across them.")
    tile_defect_share: float = _f(
        0.5, "Tiles, training: share of tiles centred on a defect pixel (the rest are drawn anywhere)."
    )
    subset: float = _f(1.0, "Fraction of the training split to use (0 < subset <= 1); tuning uses less.")
    balanced_sampling: bool = _f(False, "Sample classes evenly during training (defects are rare).")
    augment: bool = _f(True, "Mask-aligned augmentation during training.")
    hflip: bool = _f(True, "Random horizontal flips.")
    vflip: bool = _f(True, "Random vertical flips.")
    rot90: bool = _f(True, "Random 90-degree rotations.")
    scale_min: float = _f(0.7, "Smallest crop side as a fraction of the image for random scale-crop; 1 disables.")
    brightness: float = _f(0.2, "Random brightness change, +/- this fraction; 0 disables.")
    contrast: float = _f(0.2, "Random contrast change, +/- this fraction; 0 disables.")
    max_image_pixels: int = _f(
        178_956_970, "Images declaring more pixels are rejected as decompression bombs (Pillow's default)."
    )
    loader_threads: int = _f(2, "Threads per training worker that decode and augment images.")
    loader_processes: int | None = _f(
        None,
        "Processes per training worker that decode and augment images instead of threads; null: none on CPU, on a "
        "GPU the worker's CPUs (resources.cpus_per_worker) minus one, at least 2.",
    )

    def __post_init__(self) -> None:
        _check(16 <= self.image_size <= 4096, "data.image_size", f"must be in [16, 4096], got {self.image_size}")
        _check(0.0 < self.subset <= 1.0, "data.subset", f"must be in (0, 1], got {self.subset}")
        _check(
            self.geometry in ("square", "aspect", "tiles"),
            "data.geometry",
            f"must be 'square', 'aspect' or 'tiles', got {self.geometry!r}",
        )
        _check(0.01 <= self.scale <= 4.0, "data.scale", f"must be in [0.01, 4], got {self.scale}")
        _check(16 <= self.tile_size <= 4096, "data.tile_size", f"must be in [16, 4096], got {self.tile_size}")
        _check(
            0 <= self.tile_overlap <= self.tile_size // 2,
            "data.tile_overlap",
            f"must be in [0, tile_size / 2 = {self.tile_size // 2}], got {self.tile_overlap}",
        )
        _check(0.0 <= self.tile_defect_share <= 1.0, "data.tile_defect_share", "must be in [0, 1]")
        _check(0.05 <= self.scale_min <= 1.0, "data.scale_min", f"must be in [0.05, 1], got {self.scale_min}")
        _check(0.0 <= self.brightness < 1.0, "data.brightness", f"must be in [0, 1), got {self.brightness}")
        _check(0.0 <= self.contrast < 1.0, "data.contrast", f"must be in [0, 1), got {self.contrast}")
        _check(self.max_image_pixels > 0, "data.max_image_pixels", "must be positive")
        _check(self.loader_threads >= 0, "data.loader_threads", "must be >= 0")
        _check(
            self.loader_processes is None or self.loader_processes >= 0, "data.loader_processes", "must be >= 0 or null"
        )


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = _f("dinov3-s", "Backbone name from `raydefect models` (e.g. dinov3-s, dinov3-b, dinov2-s).")
    pretrained: bool = _f(True, "Load pretrained weights (timm / Hugging Face hub, or `model.weights`).")
    weights: str | None = _f(None, "Local weights file (.safetensors, or Meta's official DINOv3/DINOv2 .pth).")
    feature_blocks: int = _f(4, "How many transformer blocks (evenly spaced, last included) feed the decoder.")
    decoder_dim: int = _f(128, "Channels of the segmentation decoder.")
    head_hidden: int = _f(256, "Hidden units of the classification head.")
    dropout: float = _f(0.1, "Dropout before the classifier.")
    drop_path_rate: float = _f(0.1, "Stochastic depth of the backbone during fine-tuning.")
    mask_classes: bool = _f(
        False,
        "Also predict each pixel's class (one channel per class plus background; needs a dataset prepared with "
        "per-pixel classes, docs/labels.md). The binary defect mask stays.",
    )

    def __post_init__(self) -> None:
        _check(bool(self.backbone), "model.backbone", "must not be empty; see `raydefect models`")
        try:
            resolve_backbone(self.backbone)
        except ModelError as e:
            raise ConfigError(f"model.backbone: {e}") from None
        _check(self.feature_blocks >= 1, "model.feature_blocks", "must be >= 1")
        _check(self.decoder_dim >= 8, "model.decoder_dim", "must be >= 8")
        _check(self.head_hidden >= 8, "model.head_hidden", "must be >= 8")
        _check(0.0 <= self.dropout < 1.0, "model.dropout", "must be in [0, 1)")
        _check(0.0 <= self.drop_path_rate < 1.0, "model.drop_path_rate", "must be in [0, 1)")
        _check(
            not (self.weights and not self.pretrained),
            "model.weights",
            "is set but model.pretrained is false; drop one of them",
        )


@dataclass(frozen=True)
class OptimConfig:
    lr: float = _f(1e-4, "Peak learning rate of the backbone's last block (full fine-tune stage).")
    head_lr: float = _f(1e-3, "Learning rate of the heads and decoder.")
    weight_decay: float = _f(0.05, "AdamW weight decay (not applied to norms and biases).")
    layer_decay: float = _f(0.75, "Layer-wise LR decay: block i from the top gets lr * layer_decay**i.")
    grad_clip: float = _f(1.0, "Clip the gradient norm to this value; 0 disables.")
    grad_accum: int = _f(1, "Accumulate gradients over this many batches before a step.")
    label_smoothing: float = _f(0.0, "Label smoothing of the classification loss.")
    class_weights: str = _f("balanced", "Classification loss weights: 'balanced' (inverse frequency) or 'none'.")
    cls_weight: float = _f(1.0, "Weight of the classification cross-entropy.")
    bce_weight: float = _f(1.0, "Weight of the pixel BCE loss.")
    dice_weight: float = _f(1.0, "Weight of the Dice loss on masks.")

    def __post_init__(self) -> None:
        _check(0.0 < self.lr < 1.0, "optim.lr", f"must be in (0, 1), got {self.lr}")
        _check(0.0 < self.head_lr < 1.0, "optim.head_lr", f"must be in (0, 1), got {self.head_lr}")
        _check(self.weight_decay >= 0.0, "optim.weight_decay", "must be >= 0")
        _check(0.0 < self.layer_decay <= 1.0, "optim.layer_decay", "must be in (0, 1]")
        _check(self.grad_clip >= 0.0, "optim.grad_clip", "must be >= 0")
        _check(self.grad_accum >= 1, "optim.grad_accum", "must be >= 1")
        _check(0.0 <= self.label_smoothing < 1.0, "optim.label_smoothing", "must be in [0, 1)")
        _check(
            self.class_weights in ("balanced", "none"),
            "optim.class_weights",
            f"must be 'balanced' or 'none', got {self.class_weights!r}",
        )
        for k in ("cls_weight", "bce_weight", "dice_weight"):
            _check(getattr(self, k) >= 0.0, f"optim.{k}", "must be >= 0")
        _check(
            self.cls_weight + self.bce_weight + self.dice_weight > 0,
            "optim.cls_weight",
            "all loss weights are 0; set at least one of cls_weight, bce_weight, dice_weight",
        )


@dataclass(frozen=True)
class ScheduleConfig:
    frozen_epochs: int = _f(2, "Stage 1: epochs with the backbone frozen (heads only).")
    partial_epochs: int = _f(2, "Stage 2: epochs with the last `unfreeze_blocks` blocks trainable.")
    unfreeze_blocks: int = _f(4, "Stage 2: how many of the last backbone blocks are unfrozen.")
    full_epochs: int = _f(4, "Stage 3: epochs of full fine-tuning.")
    warmup_epochs: float = _f(1.0, "Linear warm-up at the start of stages 2 and 3, in epochs.")
    min_lr_ratio: float = _f(0.01, "Cosine decay ends at lr * min_lr_ratio.")
    metric: str = _f("val_score", "Validation metric for best-checkpoint choice and early stopping.")
    mode: str = _f("max", "'max' or 'min': whether a larger `metric` is better.")
    patience: int = _f(0, "Stop after this many epochs without improvement of `metric`; 0 disables.")

    def __post_init__(self) -> None:
        for k in ("frozen_epochs", "partial_epochs", "full_epochs"):
            _check(getattr(self, k) >= 0, f"schedule.{k}", "must be >= 0")
        _check(
            self.frozen_epochs + self.partial_epochs + self.full_epochs > 0,
            "schedule.frozen_epochs",
            "all stages have 0 epochs; give at least one stage some epochs",
        )
        _check(self.unfreeze_blocks >= 1, "schedule.unfreeze_blocks", "must be >= 1")
        _check(self.warmup_epochs >= 0, "schedule.warmup_epochs", "must be >= 0")
        _check(0.0 <= self.min_lr_ratio <= 1.0, "schedule.min_lr_ratio", "must be in [0, 1]")
        _check(self.mode in ("max", "min"), "schedule.mode", f"must be 'max' or 'min', got {self.mode!r}")
        _check(self.patience >= 0, "schedule.patience", "must be >= 0")

    @property
    def total_epochs(self) -> int:
        return self.frozen_epochs + self.partial_epochs + self.full_epochs


@dataclass(frozen=True)
class TrainConfig:
    name: str | None = _f(None, "Run name: output goes to <runs_dir>/<name>/; re-using a name resumes it.")
    runs_dir: str = _f("runs", "Folder holding run and study folders.")
    batch_size: int = _f(16, "Images per batch per worker.")
    eval_batch_size: int = _f(32, "Images per batch during validation.")
    seed: int = _f(0, "Seed for weights, sampling and augmentation.")
    precision: str = _f(
        "auto",
        "'auto' (bf16 autocast on GPU, fp32 on CPU), 'bf16' (also on CPUs with AVX512-BF16 / AMX: about 2x a CNN's "
        "training step; fp32 with a warning on other CPUs) or 'fp32'. Validation on a CPU stays fp32.",
    )
    keep_checkpoints: int = _f(2, "Keep the best K checkpoints by `schedule.metric`, plus the last.")
    max_failures: int = _f(1, "Ray Train restarts the worker group from the last checkpoint this many times.")

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        _check(self.eval_batch_size >= 1, "train.eval_batch_size", "must be >= 1")
        _check(
            self.precision in ("auto", "bf16", "fp32"),
            "train.precision",
            f"must be 'auto', 'bf16' or 'fp32', got {self.precision!r}",
        )
        _check(self.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
        _check(self.max_failures >= -1, "train.max_failures", "must be >= -1 (-1 retries forever)")
        if self.name is not None:
            _check(
                bool(self.name) and "/" not in self.name and self.name not in (".", ".."),
                "train.name",
                f"must be a plain folder name, got {self.name!r}",
            )


@dataclass(frozen=True)
class TuneConfig:
    space: str = _f("tune", "Search space: a shipped name (configs/<name>.yaml) or a YAML path.")
    name: str | None = _f(None, "Study name: output goes to <runs_dir>/tune-<name>/.")
    num_samples: int = _f(8, "Number of trials.")
    time_budget_s: float | None = _f(
        None, "Stop the study after this many seconds (running trials stop there; finished ones count)."
    )
    metric: str = _f("val_score", "Validation metric that trials are ranked by (also their checkpoint metric).")
    mode: str = _f("max", "'max' or 'min'.")
    seed: int = _f(0, "Seed of the Optuna TPE sampler.")
    max_concurrent: int | None = _f(None, "Concurrent trials; default: derived from cluster resources.")
    grace_period: int = _f(1, "ASHA: epochs every trial runs before it may be stopped.")
    reduction_factor: int = _f(3, "ASHA: keep the top 1/reduction_factor at each rung.")
    subset: float = _f(0.5, "Fraction of the training split each trial uses (multi-fidelity).")
    image_size: int | None = _f(None, "Image size during trials; default: data.image_size.")
    epochs: int | None = _f(None, "Epochs per trial (scales the three stages); default: schedule's total.")

    def __post_init__(self) -> None:
        _check(self.num_samples >= 1, "tune.num_samples", "must be >= 1")
        _check(self.time_budget_s is None or self.time_budget_s > 0, "tune.time_budget_s", "must be positive")
        _check(self.mode in ("max", "min"), "tune.mode", f"must be 'max' or 'min', got {self.mode!r}")
        _check(self.max_concurrent is None or self.max_concurrent >= 1, "tune.max_concurrent", "must be >= 1")
        _check(self.grace_period >= 1, "tune.grace_period", "must be >= 1")
        _check(self.reduction_factor >= 2, "tune.reduction_factor", "must be >= 2")
        _check(0.0 < self.subset <= 1.0, "tune.subset", "must be in (0, 1]")
        _check(self.image_size is None or self.image_size >= 16, "tune.image_size", "must be >= 16")
        _check(self.epochs is None or self.epochs >= 1, "tune.epochs", "must be >= 1")


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)

    def __post_init__(self) -> None:
        spec = resolve_backbone(self.model.backbone)  # cross-section: the ViT grid must tile the image
        if self.data.geometry == "tiles":
            check_image_size(spec, self.data.tile_size, key="data.tile_size")
            _check(not self.model.mask_classes, "model.mask_classes", "is not available with data.geometry=tiles yet")
        else:
            check_image_size(spec, self.data.image_size, key="data.image_size")
        if self.tune.image_size is not None:
            check_image_size(spec, self.tune.image_size, key="tune.image_size")

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain, YAML/JSON-safe nested dict (tuples become lists)."""
        return {f.name: _section_to_dict(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> Config:
        """Build and validate from a nested dict; unknown keys are errors."""
        return build_config(data, source=source)

    def replace(self, **overrides: Any) -> Config:
        """Copy with dotted-key overrides, e.g. ``cfg.replace(**{"optim.lr": 1e-3})``; re-validated."""
        merged = self.to_dict()
        for key, value in overrides.items():
            set_dotted(merged, key, value, source="override")
        return build_config(merged, source="override")


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)}  # type: ignore[misc]


def _section_to_dict(section: Any) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def suggest(word: str, options: Iterable[str], prefix: str = "") -> str:
    options = list(options)
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    if close:
        return f"; did you mean '{prefix}{close[0]}'?"
    return f"; valid keys: {', '.join(prefix + o for o in sorted(options))}"


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting what is unambiguous (int->float, list->tuple)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, tp, key)
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, *_rest) = typing.get_args(tp) or (Any,)
        return tuple(_coerce(v, item_tp, key) for v in value)
    if tp is Any:
        return value
    scalar = _SCALARS.get(tp)
    if scalar is None:
        raise ConfigError(f"{key}: unsupported type {tp!r}")  # pragma: no cover - a programming error
    return scalar(value, key)


def _coerce_union(value: Any, tp: Any, key: str) -> Any:
    """The first member of the union that takes `value`; None where the union allows it."""
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _coerce(value, arg, key)
        except ConfigError as e:
            errors.append(str(e))
    raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")


def _to_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    raise ConfigError(f"{key}: expected true or false, got {value!r}")


def _to_int(value: Any, key: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise ConfigError(f"{key}: expected an integer, got {value!r}")


def _to_float(value: Any, key: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
        try:
            return float(value)
        except ValueError:
            pass
    raise ConfigError(f"{key}: expected a number, got {value!r}")


def _to_str(value: Any, key: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"{key}: expected a string, got {value!r}")


_SCALARS: dict[Any, Callable[[Any, str], Any]] = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


def build_section(name: str, cls: type, values: Mapping[str, Any], source: str) -> Any:
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise ConfigError(f"{source}: section '{name}' must be a mapping of keys to values, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"{source}: unknown key '{name}.{key}'" + suggest(str(key), names, prefix=f"{name}."))
        kwargs[key] = _coerce(value, hints[key], f"{name}.{key}")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def build_config(data: Mapping[str, Any] | None, source: str = "config") -> Config:
    """Nested dict -> validated `Config`."""
    data = data or {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping of sections (data, model, ...), got {type(data).__name__}")
    for key in data:
        if key not in SECTIONS:
            raise ConfigError(f"{source}: unknown section '{key}'" + suggest(str(key), SECTIONS))
    sections = {name: build_section(name, cls, data.get(name) or {}, source) for name, cls in SECTIONS.items()}
    return Config(**sections)


def set_dotted(tree: dict[str, Any], key: str, value: Any, source: str) -> None:
    parts = key.split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"{source}: '{key}' must look like section.key, e.g. optim.lr")
    section, name = parts
    if section not in SECTIONS:
        raise ConfigError(f"{source}: unknown section '{section}' in '{key}'" + suggest(section, SECTIONS))
    tree.setdefault(section, {})
    if not isinstance(tree[section], dict):
        raise ConfigError(f"{source}: section '{section}' must be a mapping")
    tree[section][name] = value
