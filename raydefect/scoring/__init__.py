"""Bulk scoring core (no Ray): inputs, the batch scorer, the output schema, incremental keys, the commit protocol
and reading results back. `raydefect.pipelines.score` feeds these from Ray Data."""
