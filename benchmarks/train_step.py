"""SAR pre-training step time, cubes/s and data-wait fraction at full (1.0) and demo (0.25) U-Net width.

Run on demand: ``python benchmarks/transforms.py`` measures the corruption alone;
this one times whole training steps as ``sar3d pretrain`` runs them
(:func:`sar3d.pretraining.run.batch_stream` + :func:`sar3d.pretraining.run.train_steps`) on
synthetic 64x64x32 cube shards: the memory-mapped store, the balanced sampler,
the Models Genesis corruption where ``transform_device`` puts it (CPU: in the
loader's workers), and the discriminator + generator step of the SAR game.
``data wait`` is the fraction of the timed steps spent waiting for the next
batch (:class:`sar3d.training.metering.EpochMeter`). Prints one table and writes
``benchmarks/out/train_step.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from sar3d.config import load_config
from sar3d.nets.weights import count_parameters
from sar3d.pretraining import registry
from sar3d.pretraining.base import PretrainJob
from sar3d.pretraining.run import Trainer
from sar3d.pretraining.streams import BatchSource, open_stores, resolve_transform_device
from sar3d.training import devices
from sar3d.training.distributed import Distributed

REPO = Path(__file__).resolve().parents[1]
OUT = Path(__file__).resolve().parent / "out" / "train_step.json"
SIZE = (64, 64, 32)


def write_shard(folder: Path, modality: int, n: int, seed: int) -> Path:
    """A cube shard in the architecture.md layout with uniform-noise cubes (content does not change timing)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    np.save(folder / "cubes.npy", rng.random((n, *SIZE), dtype=np.float32))
    scale = np.tile([0, 1, 2, 2], n // 4)
    pd.DataFrame({
        "index": np.arange(n), "case": [f"c{k // 8}" for k in range(n)], "channel": 0, "scale": scale,
        "scale_fraction": np.array([0.5, 0.25, 0.125])[scale], "modality": modality, "split": "train",
        "origin_x": 0, "origin_y": 0, "origin_z": 0, "size_x": 64, "size_y": 64, "size_z": 32,
    }).to_csv(folder / "meta.csv", index=False)
    (folder / "manifest.json").write_text(json.dumps({
        "dataset": folder.name, "modality": ["CT", "MRI"][modality], "n_cubes": n, "size": list(SIZE),
        "scales": [0.5, 0.25, 0.125], "ratio": [1, 1, 2], "excluded_cases": [],
    }))
    return folder


def bench(dirs: list[Path], width: float, batch: int, steps: int, workers: int, device: torch.device,
          method: str) -> dict[str, Any]:
    """Time ``steps`` steps of a method block after one warm-up step; views made where ``auto`` puts them."""
    config = load_config(REPO / "config.yaml", {"pretrain": {"width": width, "batch_size": batch}})
    model = registry.build(config, method, device)
    amp = devices.resolve_precision(config["pretrain"]["precision"], device)
    trainer = Trainer(model, model.optimizers(), device, amp, devices.make_grad_scaler(device, amp))
    in_loader = resolve_transform_device("auto", device).type == "cpu"
    stores = open_stores(model, PretrainJob(method, tuple(dirs), Path("unused"), Path("unused")))
    source = BatchSource(model, stores, device, in_loader, Distributed(), devices.pin_memory_default(device))
    stream = source.epoch("train", 0, steps + 1, workers)
    trainer.train_steps(stream, 1)  # warm-up: allocations, worker start
    if device.type == "cuda":  # pragma: no cover - needs a GPU
        torch.cuda.synchronize(device)
    meter = trainer.train_steps(stream, steps)
    meter.means()  # the per-epoch sync run_pretrain does too
    timing = meter.timing("cubes")
    return {
        "width": width, "batch": batch, "steps": steps, "workers": workers, "device": str(device),
        "method": method, "unet_parameters": count_parameters(model.unet),
        "corruption": "loader workers (cpu)" if in_loader and workers else ("in process (cpu)" if in_loader
                                                                            else str(device)),
        "step_time_s": timing["perf/step_time_s"], "cubes_per_s": timing["perf/cubes_per_s"],
        "data_wait_fraction": timing["perf/data_wait_fraction"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per setting (after one warm-up)")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers (corruption runs there)")
    parser.add_argument("--method", default="sar", help="a block name of pretrain.methods in config.yaml")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    device = devices.resolve_device(args.device)
    if device.type == "cpu":
        devices.keep_freed_memory()
    settings = [(1.0, 2), (0.25, 8)]  # full width at batch 2 keeps a CPU run short; demo width at batch 8
    if device.type == "cuda":  # pragma: no cover - needs a GPU
        settings = [(1.0, 8), (0.25, 8)]
    with tempfile.TemporaryDirectory() as tmp:
        dirs = [write_shard(Path(tmp) / "ct", 0, 32, 0), write_shard(Path(tmp) / "mri", 1, 32, 1)]
        rows = [bench(dirs, w, b, args.steps, args.workers, device, args.method) for w, b in settings]

    header = (f"{'width':>6} {'batch':>5} {'U-Net params':>13} {'step (s)':>9} {'cubes/s':>8} {'data wait':>10}"
              "  corruption")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['width']:6.2f} {r['batch']:5d} {r['unet_parameters']:13,d} {r['step_time_s']:9.3f} "
              f"{r['cubes_per_s']:8.2f} {r['data_wait_fraction']:10.1%}  {r['corruption']}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(), "rows": rows,
    }, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
