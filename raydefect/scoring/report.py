"""What one scoring run did (`ScoreReport`): the CLI prints its `summary_lines`, ``--json`` writes its `to_dict`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from raydefect.scoring.records import Recovery


@dataclass
class ScoreReport:
    """What one run did; `summary_lines` is what the CLI prints."""

    run_id: str
    model_id: str
    out: str
    input: str
    listed: int = 0
    skipped: int = 0
    repeated: int = 0  # listing entries naming a file already listed (a manifest with a path twice)
    scored: int = 0
    errors: int = 0
    storage_errors: int = 0  # of `errors`: files the storage failed to read (network, timeout), scored again next run
    defects: int = 0
    files: int = 0
    seconds: float = 0.0
    nodes: dict[str, int] = field(default_factory=dict)
    recovery: Recovery = field(default_factory=Recovery)
    # (seconds since start, rows committed, images the model had scored by then): how far commits trail scoring
    timeline: list[tuple[float, int, int]] = field(default_factory=list)
    device: str = "cpu"  # where the model actors run: "cuda" when the cluster has GPUs
    engine: str = "torch"  # what runs the model there: "torch" or "onnx" (ONNX Runtime, CPU)
    precision: str = "fp32"  # "bf16" (autocast) or "fp32", as resolved on the driver's machine
    actors: int = 1
    model_seconds: float = 0.0  # time the model actors spent in their batches (all actors summed)

    @property
    def images_per_s(self) -> float:
        return self.scored / self.seconds if self.seconds > 0 else 0.0

    def summary_lines(self) -> list[str]:
        lines = [
            f"run {self.run_id}  model {self.model_id}",
            f"images:   {self.scored:,} scored ({self.images_per_s:,.1f} images/s in {self.seconds:.1f} s), "
            f"{self.skipped:,} already scored, {self.listed:,} listed"
            + (f" ({self.repeated:,} listed twice, scored once)" if self.repeated else ""),
            f"defects:  {self.defects:,}",
            f"errors:   {self.errors:,} (rows with `error` set)"
            + (
                f"; {self.storage_errors:,} of them the storage failed to read: scored again by the next run"
                if self.storage_errors
                else ""
            ),
            f"output:   {self.out} ({self.files} new file(s))",
            f"model:    {self.actors} actor(s) on {self.device} "
            f"({'ONNX Runtime' if self.engine == 'onnx' else 'PyTorch'}, {self.precision})",
        ]
        if len(self.nodes) > 1:
            lines.append("nodes:    " + ", ".join(f"{n[:8]}: {c:,}" for n, c in sorted(self.nodes.items())))
        r = self.recovery
        if r.adopted_files or r.recovered_rows or r.interrupted_runs:
            lines.append(
                f"recovered: {len(r.interrupted_runs)} interrupted run(s), {r.recovered_rows:,} staged rows kept, "
                f"{r.dropped_rows:,} duplicates dropped, {r.adopted_files} file(s) adopted"
            )
        return lines

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["images_per_s"] = round(self.images_per_s, 2)
        return d
