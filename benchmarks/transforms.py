"""Throughput of the batched Models Genesis transforms (cubes/s), on one CPU thread and on CUDA.

Run on demand: ``python benchmarks/transforms.py [--batch 32] [--repeats 5]``.
Prints one table and writes ``benchmarks/out/transforms.json``. Each number is
the best of ``--repeats`` timed runs (the least disturbed by other processes),
after one warm-up run; the public per-cube reference does about 24 cubes/s.
glibc is told to keep freed memory (:func:`sar3d.training.devices.keep_freed_memory`),
as ``sar3d pretrain`` and its loader workers do.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from sar3d.pretraining.transforms.genesis import (
    GenesisConfig,
    GenesisTransform,
    local_pixel_shuffle,
    nonlinear_intensity,
    paint,
    random_flip,
)
from sar3d.seeding import torch_generator
from sar3d.training.devices import keep_freed_memory

OUT = Path(__file__).resolve().parent / "out" / "transforms.json"
SHAPE = (64, 64, 32)


def _time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Best wall-clock seconds of one call over ``repeats`` runs (after a warm-up)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def bench(device: torch.device, batch: int, repeats: int) -> dict[str, float]:
    """Cubes per second of the full pipeline and of each transform at the default config."""
    cfg = GenesisConfig()
    always = GenesisConfig(local_shuffle_rate=1.0)
    gen = torch_generator(0, "benchmark", device=device)
    cubes = torch.rand((batch, 1, *SHAPE), generator=gen, device=device)
    pipeline = GenesisTransform(cfg)
    cases: dict[str, Callable[[], object]] = {
        "full pipeline": lambda: pipeline(cubes, gen),
        "flip": lambda: random_flip(cubes, gen, cfg),
        "local shuffle (rate 0.5)": lambda: local_pixel_shuffle(cubes, gen, cfg),
        "local shuffle (every cube)": lambda: local_pixel_shuffle(cubes, gen, always),
        "non-linear (rate 0.9)": lambda: nonlinear_intensity(cubes, gen, cfg),
        "painting (rate 0.9)": lambda: paint(cubes, gen, cfg),
    }
    return {name: batch / _time(fn, device, repeats) for name, fn in cases.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    torch.set_num_threads(1)
    keep_freed_memory()  # as `sar3d pretrain` and its loader workers do on CPU
    results: dict[str, dict[str, float]] = {"cpu (1 thread)": bench(torch.device("cpu"), args.batch, args.repeats)}
    if torch.cuda.is_available():
        results[f"cuda ({torch.cuda.get_device_name(0)})"] = bench(torch.device("cuda"), args.batch, args.repeats)

    names = list(next(iter(results.values())))
    header = f"{'transform (64x64x32, cubes/s)':32s}" + "".join(f"{dev:>28s}" for dev in results)
    print(header)
    print("-" * len(header))
    for name in names:
        print(f"{name:32s}" + "".join(f"{results[dev][name]:28.1f}" for dev in results))

    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({
        "shape": list(SHAPE),
        "batch": args.batch,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "cubes_per_second": results,
    }, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
