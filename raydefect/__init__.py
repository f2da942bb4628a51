"""raydefect: visual defect detection at dataset scale on Ray.

The package root stays import-light so that `import raydefect` and `raydefect --help` are instant: nothing here
imports torch or ray. The Python API (`raydefect.api`) is exported lazily (PEP 562): ``raydefect.load_model``
imports it, and torch with it, on first use.
"""

__version__ = "0.1.0"

#: name -> the module that defines it, imported on first access (tests/test_boundary.py checks each one)
LAZY_EXPORTS = {
    "load_model": "raydefect.api",
    "read_scores": "raydefect.api",
    "decode_mask": "raydefect.api",
    "load_dataset": "raydefect.api",
    "Model": "raydefect.api",
    "Prediction": "raydefect.api",
}

__all__ = ["__version__", *LAZY_EXPORTS]


def __getattr__(name: str):
    module = LAZY_EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'raydefect' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *LAZY_EXPORTS})
