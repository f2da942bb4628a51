"""The GPU path of scoring: model actors with num_gpus, bf16 autocast, pinned uint8 batches normalised on the GPU.

Skipped without CUDA (conftest); run on the GPU machine with ``pytest -m gpu``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from raydefect.scoring.scorer import Decoder, ModelStep, stat_locations
from raydefect.scoring.storage import Storage

pytestmark = pytest.mark.gpu


def test_model_step_on_cuda_bf16_matches_cpu_fp32(tiny_artifact, synth_archive):
    files = sorted(str(p) for p in Path(synth_archive["out"]).rglob("*") if p.is_file())
    batch = Decoder(32, Storage())(stat_locations(files, Storage()))
    gpu = ModelStep(str(tiny_artifact), device="cuda", precision="auto")
    assert gpu.predictor.precision == "bf16" and gpu._scale is not None  # normalised on the GPU
    cpu = ModelStep(str(tiny_artifact), device="cpu", precision="fp32")
    out_gpu, out_cpu = gpu(dict(batch)), cpu(dict(batch))
    ok = np.asarray([not e for e in batch["error"]])
    assert np.allclose(out_gpu["defect_score"][ok], out_cpu["defect_score"][ok], atol=0.03)
    agree = (out_gpu["mask_prob"][ok] >= 0.5) == (out_cpu["mask_prob"][ok] >= 0.5)
    assert agree.mean() > 0.98


@pytest.mark.ray
def test_pipeline_puts_model_actors_on_gpus(ray_session, tiny_artifact, synth_archive, tmp_path):
    from raydefect.config import load_config
    from raydefect.pipelines.score import run_score

    cfg = load_config("default", sets=["score.batch_size=16"])
    r = run_score(str(tiny_artifact), synth_archive["out"], str(tmp_path / "scores"), cfg)
    assert r.device == "cuda" and r.scored == synth_archive["files"]
    assert r.actors == 2  # score.actors_per_gpu 4, capped at half of the session's 4 CPUs: two replicas share the GPU
