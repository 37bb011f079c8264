"""Every pre-training method through the seam: views/s of its generator, train-step time, the generator's share.

For each block of ``pretrain.methods`` (or ``--methods a,b``), built with
:func:`sar3d.pretraining.registry.build` on the CPU at the demo's width 0.125
and batch 8, one intra-op thread throughout:

* ``views/s``: raw samples (cubes or volumes) per second that ``make_views``
  turns into training views (median of ``--repeats`` batches);
* ``step (s)``: the median of a whole training step as the default study runs
  it on a CPU (``num_workers: 0``: views made in the process, then
  :meth:`sar3d.pretraining.run.Trainer.train_step`), steps of all methods
  interleaved so load changes hit every method alike;
* ``gen/step``: the generator's share of that step, the most a loader would
  make the step wait if views were made in the training process. Under 10 % is
  the goal; it is printed, not asserted.

Raw batches are what the stores hand out: cube methods get ``{"cube", "scale",
"modality"}`` of cubes cut (``cubes.*`` settings) from normalised phantom
volumes, restricted to the method's scales; volume methods get ``{"volumes",
"modality", "case"}`` of normalised phantom volumes, and each declared artefact
is made by the method's ``make_artefact`` into a temporary folder first. Writes
``benchmarks/out/methods.json``.

    python benchmarks/methods.py [--methods sar,cpc] [--steps 5] [--width 0.125] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sar3d.config import load_config
from sar3d.data.cubes import cut_cubes
from sar3d.data.normalise import minmax_to_unit
from sar3d.data.phantom import generate_case
from sar3d.io import save_volume, write_json
from sar3d.paths import MANIFEST
from sar3d.pretraining import registry
from sar3d.pretraining.base import VOLUMES, Batch, PretrainMethod
from sar3d.pretraining.run import Trainer
from sar3d.pretraining.streams import move_batch

REPO = Path(__file__).resolve().parents[1]
OUT = Path(__file__).resolve().parent / "out" / "methods.json"
PHANTOMS = {"chest_ct": 0, "liver_ct": 0, "brain_mri": 1, "heart_mri": 1}  # kind -> modality (0 CT, 1 MRI)
SEED = 20210806
CPU = torch.device("cpu")


def phantoms() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each phantom kind's first channel normalised to [0, 1] as pre-training volumes are, with its affine."""
    out = {}
    for kind in PHANTOMS:
        image, _, affine = generate_case(kind, SEED, 0)
        image = (image[..., 0] if image.ndim == 4 else image).astype(np.float32)
        low, high = (-1000.0, 1000.0) if kind.endswith("_ct") else (0.0, float(np.percentile(image, 99.5)))
        out[kind] = (minmax_to_unit(image, low, high, [0.0, 99.5]), affine)
    return out


def cube_pool(config: dict[str, Any], volumes: dict[str, tuple[np.ndarray, np.ndarray]]) -> Batch:
    """Cubes of every volume at the study's scales, sizes and ratio: ``{"cube", "scale", "modality"}``."""
    cfg = config["cubes"]
    counts = [r * 2 for r in cfg["ratio"]]
    cubes, scale, modality = [], [], []
    for k, (kind, (volume, affine)) in enumerate(volumes.items()):
        cut, crops = cut_cubes(volume, np.linalg.norm(affine[:3, :3], axis=0), counts, cfg["scales"],
                               cfg["size"], cfg["min_foreground"], np.random.default_rng(k))
        cubes.append(cut)
        scale += [c.scale for c in crops]
        modality += [PHANTOMS[kind]] * len(crops)
    return {"cube": torch.from_numpy(np.concatenate(cubes))[:, None], "scale": torch.tensor(scale),
            "modality": torch.tensor(modality)}


def raw_batch(method: PretrainMethod, pool: Batch, volumes: dict[str, Any], batch: int) -> Batch:
    """``batch`` raw samples as the method's store gives them (cubes of its scales, or whole volumes)."""
    if method.input == VOLUMES:
        kinds = [list(volumes)[i % len(volumes)] for i in range(batch)]
        return {"volumes": [torch.from_numpy(volumes[k][0])[None] for k in kinds],
                "modality": torch.tensor([PHANTOMS[k] for k in kinds]), "case": kinds}
    scales = method.cube_scales()
    keep = [i for i, s in enumerate(pool["scale"].tolist()) if scales is None or s in scales]
    pick = torch.tensor([keep[i % len(keep)] for i in range(batch)])
    return {k: v[pick] for k, v in pool.items()}


def make_artefacts(config: dict[str, Any], name: str, volumes: dict[str, Any], root: Path) -> dict[str, Any]:
    """Each artefact the method declares, made by its own ``make_artefact`` from the phantom volumes."""
    cls = registry.method_class(config, name)
    if not cls.artefacts:
        return {}
    folder = root / "volumes"
    if not (folder / MANIFEST).exists():
        for kind, (volume, affine) in volumes.items():
            save_volume(folder / f"images/{kind}.nii.gz", volume, affine)
        write_json(folder / MANIFEST, {"dataset": "phantoms", "modality": "mixed", "cases": [
            {"case": kind, "channel": 0, "image": f"images/{kind}.nii.gz"} for kind in volumes]})
    dirs = {}
    for artefact in cls.artefacts:
        dirs[artefact] = (root / name / artefact,)
        cls.make_artefact(config, name, artefact, folder, dirs[artefact][0])
    return dirs


def generator_seconds(method: PretrainMethod, raw: Batch, repeats: int) -> float:
    """Median seconds of one ``make_views`` call on the raw batch (one warm-up call first)."""
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        method.make_views(raw, torch.Generator().manual_seed(i))
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", help="comma-separated block names (default: every block of the config)")
    parser.add_argument("--config", type=Path, default=REPO / "config.yaml")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per method (after one warm-up)")
    parser.add_argument("--repeats", type=int, default=10, help="timed make_views calls per method")
    parser.add_argument("--width", type=float, default=0.125)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = load_config(args.config, {"pretrain": {"width": args.width, "batch_size": args.batch}})
    names = args.methods.split(",") if args.methods else list(config["pretrain"]["methods"])
    volumes = phantoms()
    pool = cube_pool(config, volumes)
    methods, raws, gen_s, artefact_s, steps = {}, {}, {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            start = time.perf_counter()
            dirs = make_artefacts(config, name, volumes, Path(tmp))
            artefact_s[name] = time.perf_counter() - start if dirs else None
            methods[name] = method = registry.build(config, name, CPU)
            method.artefact_dirs = dirs
            raws[name] = raw_batch(method, pool, volumes, args.batch)
            gen_s[name] = generator_seconds(method, raws[name], args.repeats)
            steps[name] = (Trainer.single(method), [])
        for i in range(args.steps + 1):  # interleaved, so load changes hit every method alike
            for name, (trainer, times) in steps.items():
                start = time.perf_counter()
                views = methods[name].make_views(move_batch(raws[name], CPU),
                                                 torch.Generator().manual_seed(i))
                trainer.train_step(move_batch(views, CPU))
                if i:  # the first step warms up allocations
                    times.append(time.perf_counter() - start)
    rows = []
    for name in names:
        step = statistics.median(steps[name][1])
        rows.append({"method": name, "kind": methods[name].kind, "input": methods[name].input,
                     "views_per_s": args.batch / gen_s[name], "generator_ms_per_batch": 1e3 * gen_s[name],
                     "step_s": step, "generator_share_of_step": gen_s[name] / step,
                     "artefact_s": artefact_s[name]})
    print(f"width {args.width}, batch {args.batch}, 1 CPU thread, median of {args.steps} steps")
    print(f"{'method':11s} {'input':8s} {'views/s':>9s} {'gen ms/batch':>13s} {'step (s)':>9s} {'gen/step':>9s}")
    for r in rows:
        flag = "" if r["generator_share_of_step"] < 0.1 else "  (>= 10 %)"
        print(f"{r['method']:11s} {r['input']:8s} {r['views_per_s']:9.1f} {r['generator_ms_per_batch']:13.1f} "
              f"{r['step_s']:9.3f} {r['generator_share_of_step']:9.1%}{flag}")
    for r in rows:
        if r["artefact_s"] is not None:
            print(f"{r['method']}: artefacts of {len(volumes)} phantom volumes in {r['artefact_s']:.1f} s")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"torch": torch.__version__, "machine": platform.processor() or platform.machine(),
                               "threads": 1, "width": args.width, "batch": args.batch, "steps": args.steps,
                               "config": str(args.config), "rows": rows}, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
