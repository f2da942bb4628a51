"""Training throughput through Ray Train against the same loop in plain PyTorch: prints one JSON line.

    python benchmarks/train_throughput.py --backbone dinov3-s --size 96 --images 320 --epochs 4

Both sides train the same config on the same synthetic dataset: ``raydefect.engine.fit.fit`` (one process, no Ray)
and ``raydefect.pipelines.train.run_training`` (one Ray Train worker holding every core, its data read through Ray
Data, a checkpoint reported to Ray every epoch). Each side runs the same `Trainer`, so the ratio is Ray's overhead:
worker process, the shard read, ``ray.train.report`` and Ray's copy of every checkpoint into the run folder.

Figures: ``*_images_per_s`` is steady-state epoch-to-epoch throughput (training images of epochs 2..N over the wall
time from the end of epoch 1 to the end of epoch N: training, validation, checkpointing, reporting; epoch 1 holds
warm-up), ``*_loop_images_per_s`` the training phase alone, ``*_images_per_cpu_s`` training images per CPU-second
of the training process (what other load on a shared machine moves least), ``*_wall_s`` each whole call including
start-up. Each figure is the best of ``--repeats`` alternating runs per side (a shared machine disturbs some).

Default model: dinov3-s (21M-parameter backbone, random init: no weights needed) at 96 px, the first size where
its forward + backward costs far more than decoding + augmenting a 96 px PNG (< 1 ms): compute dominates, as on a
real run, so the ratio measures the training path rather than the data path.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _steady(history: list[dict]) -> float:
    rows = sorted(history, key=lambda r: r["epoch"])
    if len(rows) < 2:
        return float("nan")
    images = sum(r["train_images"] for r in rows[1:])
    return images / (rows[-1]["finished_at"] - rows[0]["finished_at"])


def _loop(history: list[dict]) -> float:
    rows = sorted(history, key=lambda r: r["epoch"])[1:] or history
    return sum(r["train_images"] for r in rows) / sum(r["train_seconds"] for r in rows)


def _per_cpu_s(history: list[dict]) -> float:
    rows = sorted(history, key=lambda r: r["epoch"])[1:] or history
    return sum(r["train_images"] for r in rows) / sum(r["cpu_seconds"] for r in rows)


def _compute_only(config: dict) -> dict:
    """The model's forward + backward + AdamW step on one fixed random batch, ``steps`` times: no data, no
    validation, no checkpoints. Returns wall and CPU seconds of the timed steps (after 3 warm-up steps)."""
    import torch

    from raydefect.config import ModelConfig
    from raydefect.models.model import DefectModel

    torch.set_num_threads(config["cpus"])
    torch.manual_seed(0)
    size, batch = config["size"], config["batch_size"]
    net = DefectModel(ModelConfig(backbone=config["backbone"], pretrained=False), size, ("normal", "a", "b", "c"))
    opt = torch.optim.AdamW(net.parameters(), 1e-4)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 4, (batch,))
    masks = (torch.rand(batch, 1, size, size) > 0.9).float()

    def step() -> None:
        out = net(x)
        loss = torch.nn.functional.cross_entropy(out.class_logits, y)
        loss = loss + torch.nn.functional.binary_cross_entropy_with_logits(out.mask_logits, masks)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(config["steps"]):
        step()
    return {"wall_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu}


def _floor_worker(config: dict) -> None:
    import ray.train

    Path(config["out"]).write_text(json.dumps(_compute_only(config)))
    ray.train.report({})


def floor(args: argparse.Namespace, tmp: str) -> dict:
    """The same compute-only loop in a plain process and in a one-worker `TorchTrainer`, alternating: what Ray
    Train's own processes (controller, worker actor, Ray's daemons) cost on this machine, whatever raydefect does."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raydefect.pipelines.cluster import connect

    config = {"backbone": args.backbone, "size": args.size, "batch_size": args.batch_size, "cpus": args.cpus,
              "steps": args.floor_steps, "out": str(Path(tmp) / "floor.json")}  # fmt: skip
    connect(None, num_cpus=args.cpus)
    plain, ray_side = [], []
    for i in range(args.repeats):
        plain.append(_compute_only(config))
        TorchTrainer(
            _floor_worker,
            train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": args.cpus}),
            run_config=RunConfig(name=f"floor{i}", storage_path=str(Path(tmp) / "floor")),
        ).fit()
        ray_side.append(json.loads(Path(config["out"]).read_text()))
    best_plain, best_ray = min(r["wall_s"] for r in plain), min(r["wall_s"] for r in ray_side)
    return {
        "floor_steps": args.floor_steps,
        "floor_plain_wall_s": [round(r["wall_s"], 2) for r in plain],
        "floor_ray_wall_s": [round(r["wall_s"], 2) for r in ray_side],
        "floor_ratio": round(best_plain / best_ray, 3),  # Ray Train's rate / plain rate, compute only
        "floor_cpu_ratio": round(min(r["cpu_s"] for r in plain) / min(r["cpu_s"] for r in ray_side), 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="dinov3-s")
    p.add_argument("--size", type=int, default=96, help="image side the model sees")
    p.add_argument("--images", type=int, default=320, help="synthetic images in total (80%% train)")
    p.add_argument("--epochs", type=int, default=4, help="full fine-tuning epochs (>= 2; the first is warm-up)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="torch threads / CPUs of the Ray worker")
    p.add_argument("--repeats", type=int, default=2, help="alternating runs per side; the best counts")
    p.add_argument(
        "--loader-threads",
        type=int,
        default=1,
        help="data.loader_threads: decode + augment threads per worker (a GPU needs several to be fed)",
    )
    p.add_argument(
        "--loader-processes",
        default="null",
        help="data.loader_processes: decode + augment processes per worker (null: none on CPU, the CPUs - 1 on a GPU)",
    )
    p.add_argument("--precision", default="auto", help="train.precision: auto (bf16 on GPU), bf16 or fp32")
    p.add_argument("--skip-plain", action="store_true")
    p.add_argument(
        "--floor",
        action="store_true",
        help="also time a compute-only loop (random batch, no data/validation/checkpoints) plain and in a bare "
        "TorchTrainer: the ratio Ray Train itself allows on this machine",
    )
    p.add_argument("--floor-steps", type=int, default=40, help="steps of the compute-only loop")
    args = p.parse_args()
    # The Ray worker gets OMP_NUM_THREADS from Ray (= its CPUs); give the plain loop the same OpenMP set-up. Without
    # it, libgomp spins differently and the plain loop runs up to 10x slower on a busy machine (measured here).
    os.environ["OMP_NUM_THREADS"] = str(args.cpus)

    import torch

    from raydefect import console
    from raydefect.config import load_config
    from raydefect.data.synth import synthetic_dataset
    from raydefect.engine.fit import fit
    from raydefect.pipelines.cluster import connect
    from raydefect.pipelines.train import run_training

    console.set_verbosity(-1)
    with tempfile.TemporaryDirectory(prefix="raydefect-bench-") as tmp:
        synthetic_dataset(tmp, args.images, args.size)
        cfg = load_config(
            None,
            sets=[
                f"data.dataset={Path(tmp) / 'ds'}",
                f"model.backbone={args.backbone}",
                "model.pretrained=false",
                f"data.image_size={args.size}",
                f"data.loader_threads={args.loader_threads}",
                f"data.loader_processes={args.loader_processes}",
                f"train.precision={args.precision}",
                "schedule.frozen_epochs=0",
                "schedule.partial_epochs=0",
                f"schedule.full_epochs={args.epochs}",
                f"train.batch_size={args.batch_size}",
                f"resources.cpus_per_worker={args.cpus}",
                f"train.runs_dir={Path(tmp) / 'runs'}",
            ],
        )
        out: dict = {
            "benchmark": "train_throughput",
            "backbone": args.backbone,
            "image_size": args.size,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "cpus": args.cpus,
            "repeats": args.repeats,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "precision": "bf16" if torch.cuda.is_available() and args.precision != "fp32" else "fp32",
            "loader_threads": args.loader_threads,
            "loader_processes": args.loader_processes,
        }
        torch.set_num_threads(args.cpus)
        runs: dict[str, list[dict]] = {"plain": [], "ray": []}
        for i in range(args.repeats):  # alternate, so both sides see the same (shared) machine
            for side in ("ray", "plain") if i % 2 else ("plain", "ray"):
                if side == "plain" and args.skip_plain:
                    continue
                t = time.perf_counter()
                if side == "plain":
                    history = fit(cfg, Path(tmp) / "ds", Path(tmp) / "runs" / f"plain{i}", export=False).history
                else:
                    connect(None, num_cpus=args.cpus)
                    history = run_training(cfg, name=f"ray{i}", export=False, show_progress=False).history
                runs[side].append(
                    {
                        "wall_s": round(time.perf_counter() - t, 2),
                        "images_per_s": round(_steady(history), 3),
                        "loop_images_per_s": round(_loop(history), 3),
                        "images_per_cpu_s": round(_per_cpu_s(history), 3),
                    }
                )
                out["train_images_per_epoch"] = history[0]["train_images"]
        for side, results in runs.items():
            if not results:
                continue
            for key in ("images_per_s", "loop_images_per_s", "images_per_cpu_s"):
                out[f"{side}_{key}"] = max(r[key] for r in results)  # best of the repeats: least disturbed
            out[f"{side}_wall_s"] = [r["wall_s"] for r in results]
        if runs["plain"] and runs["ray"]:
            out["ratio"] = round(out["ray_images_per_s"] / out["plain_images_per_s"], 3)
            out["loop_ratio"] = round(out["ray_loop_images_per_s"] / out["plain_loop_images_per_s"], 3)
            out["cpu_ratio"] = round(out["ray_images_per_cpu_s"] / out["plain_images_per_cpu_s"], 3)
        out["runs"] = runs
        if args.floor:
            out.update(floor(args, tmp))
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
