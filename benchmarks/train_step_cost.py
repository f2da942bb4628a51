"""CPU cost of one training step by precision and memory format: prints one JSON line per setting.

    nice python benchmarks/train_step_cost.py                          # resnet10t at 160 and 224 px
    nice python benchmarks/train_step_cost.py --backbone resnet18 --sizes 256

The step is training's (`raydefect.engine.loop.train_one_epoch`): forward, the `DefectLoss` (cross-entropy + BCE +
Dice), backward, AdamW, on a random-init `DefectModel` with six classes and random inputs (the cost does not depend
on the values). Settings: fp32 or bf16 autocast (``train.precision=bf16``), NCHW or channels-last weights and inputs
(what training uses for CNNs). bf16 pays only on a CPU with bf16 instructions (``avx512_bf16`` / ``amx_bf16``;
the line says whether this one has them). CPU seconds per image over ``--steps`` steps after one warm-up step,
with ``--threads`` torch threads.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time


def step_cost(backbone: str, size: int, precision: str, channels_last: bool, args: argparse.Namespace) -> float:
    import torch

    from raydefect.config import ModelConfig
    from raydefect.geometry import Geometry
    from raydefect.models.losses import DefectLoss
    from raydefect.models.model import DefectModel

    torch.manual_seed(0)
    classes = ("normal", "a", "b", "c", "d", "e")
    model = DefectModel(
        ModelConfig(backbone=backbone, pretrained=False), size, classes, geometry=Geometry("square", size)
    )
    x = torch.randn(args.batch, 3, size, size)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), 5e-4)
    loss_fn = DefectLoss(class_weights=None)
    labels = torch.randint(0, len(classes), (args.batch,))
    masks = (torch.rand(args.batch, 1, size, size) > 0.9).float()
    bf16 = precision == "bf16"
    start = 0.0
    for i in range(args.steps + 1):
        if i == 1:
            start = time.process_time()
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            out = model(x)
        loss = loss_fn(out.class_logits, out.mask_logits, labels, masks).total
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (time.process_time() - start) / args.steps / args.batch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="resnet10t")
    p.add_argument("--sizes", type=int, nargs="+", default=[160, 224])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    import torch

    from raydefect.inference.device import cpu_has_native_bf16

    torch.set_num_threads(args.threads)
    for size in args.sizes:
        base = None
        for precision, channels_last in (("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)):
            cost = step_cost(args.backbone, size, precision, channels_last, args)
            base = base or cost
            line = {
                "benchmark": "train_step_cost",
                "backbone": args.backbone,
                "size": size,
                "precision": precision,
                "channels_last": channels_last,
                "cpu_ms_per_image": round(cost * 1e3, 1),
                "speedup_over_fp32_nchw": round(base / cost, 2),
                "cpu_has_native_bf16": cpu_has_native_bf16(),
                "threads": args.threads,
            }
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
