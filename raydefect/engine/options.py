"""What a training starts from, beyond config keys: the config a re-used run name saved (the same command resumes
that run), and ``--epochs`` / ``--freeze-backbone`` turned into the three stages' epochs. The CLI parses the flags;
the rules live here."""

from __future__ import annotations

from pathlib import Path

from raydefect.config import Config, ScheduleConfig
from raydefect.engine.run import CONFIG_FILE
from raydefect.engine.schedule import split_epochs
from raydefect.errors import ConfigError

#: The config keys of the three stages' epochs, in stage order.
STAGE_KEYS = ("schedule.frozen_epochs", "schedule.partial_epochs", "schedule.full_epochs")


def saved_config(cfg: Config) -> Path | None:
    """The config.yaml that the run named ``train.name`` saved, which resuming it starts from; None for a new name."""
    if not cfg.train.name:
        return None
    saved = Path(cfg.train.runs_dir).expanduser() / cfg.train.name / CONFIG_FILE
    return saved if saved.is_file() else None


def refuse_frozen_random_backbone(cfg: Config, freeze_backbone: bool) -> None:
    """``--freeze-backbone`` on a random-init backbone would train the heads on noise: a `ConfigError` saying so."""
    if freeze_backbone and not (cfg.model.pretrained or cfg.model.weights):
        raise ConfigError(
            f"--freeze-backbone: the backbone {cfg.model.backbone} is random-init (model.pretrained=false, no "
            "model.weights): freezing it would train the heads on noise. Drop --freeze-backbone to train it whole, "
            "or load weights (model.pretrained=true or model.weights=PATH)"
        )


def stage_epochs(
    schedule: ScheduleConfig, epochs: tuple[int, ...] | None, freeze_backbone: bool
) -> tuple[int, ...] | None:
    """(frozen, partial, full) epochs for ``--epochs`` (a total spread as `schedule` spreads it, or one per stage)
    and ``--freeze-backbone`` (stage 1 only); None when neither is given. `ValueError` for per-stage epochs with
    ``--freeze-backbone``."""
    if epochs is None and not freeze_backbone:
        return None
    if freeze_backbone:
        total = epochs[0] if epochs and len(epochs) == 1 else (schedule.frozen_epochs or schedule.total_epochs)
        if epochs and len(epochs) == 3:
            raise ValueError("with --freeze-backbone give one number of epochs")
        return (total, 0, 0)
    if epochs is not None and len(epochs) == 3:
        return epochs
    return split_epochs(epochs[0], schedule)  # type: ignore[index]
