"""raydefect: visual defect detection at dataset scale on Ray.

The package root stays import-light so that `raydefect --help` is instant: nothing here imports torch or ray.
"""

__version__ = "0.1.0"
