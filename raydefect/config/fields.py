"""What every config section is made of: documented fields and checks that name the key the user typed."""

from __future__ import annotations

from dataclasses import field
from typing import Any

from raydefect.errors import ConfigError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def doc_field(default: Any, doc: str) -> Any:
    """A dataclass field with its documentation attached."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults are not allowed in frozen configs; use a tuple")
    return field(default=default, metadata={"help": doc})


def check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {message}")
