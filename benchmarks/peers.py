"""VectorPOSE and SepaReg: views/s of each generator and train-step time, on one CPU thread.

Run on demand (``python benchmarks/peers.py``). Inputs are phantom volumes of
the default study (chest CT, brain MRI) normalised to [0, 1] as pre-training
volumes are; the U-Net is at demo width (0.125) and the batch is 8 views of
64x64x32. Timed parts:

* VectorPOSE views: crop + orientation + resize, boundary target, corruption;
* SepaReg separation: body mask + SLIC per volume (the cached artefact, once per volume);
* SepaReg views: region crop (mask, box, resize) + the two augmented views;
* steps: one optimiser step of each objective (VP + BFR; SimSiam; distillation from two teachers).

Prints one table and writes ``benchmarks/out/peers.json``.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from sar3d.data.normalise import minmax_to_unit
from sar3d.data.phantom import generate_case
from sar3d.nets.unet import UNet3D
from sar3d.pretraining.methods.separeg import (
    RegionViews,
    SiameseBranch,
    distillation_step,
    make_experts,
    simsiam_step,
)
from sar3d.pretraining.methods.separeg_regions import RegionConfig, compute_regions, region_crop
from sar3d.pretraining.methods.vectorpose import (
    VectorHead,
    VectorPoseConfig,
    VectorPoseViews,
    boundary_losses,
    vector_losses,
)

OUT = Path(__file__).resolve().parent / "out" / "peers.json"
BATCH = 8
WIDTH = 0.125
SEED = 20210806


def volumes() -> list[tuple[np.ndarray, tuple[float, float, float]]]:
    out = []
    for kind, low, high in (("chest_ct", -1000.0, 1000.0), ("brain_mri", 0.0, None)):
        image, _, affine = generate_case(kind, SEED, 0)
        image = (image[..., 0] if image.ndim == 4 else image).astype(np.float32)
        top = float(np.percentile(image, 99.5)) if high is None else high
        spacing = tuple(float(v) for v in np.abs(np.diag(affine))[:3])
        out.append((minmax_to_unit(image, low, top, [0.0, 99.5]), spacing))
    return out


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Seconds per call, after one warm-up call."""
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    vols = volumes()
    rows: dict[str, float] = {}

    vp_views = VectorPoseViews(VectorPoseConfig())
    seconds = timed(lambda: vp_views([vols[0][0]], BATCH, generator), 3)
    rows["vectorpose views/s"] = BATCH / seconds

    cfg = RegionConfig()
    seconds = timed(lambda: compute_regions(*vols[0], cfg), 2)
    rows["separeg separation s/volume (chest CT phantom)"] = seconds
    regions = compute_regions(*vols[0], cfg)
    views = RegionViews()

    def region_views() -> tuple[torch.Tensor, torch.Tensor]:
        pick = torch.randint(0, len(regions), (BATCH,), generator=generator).tolist()
        crops = torch.from_numpy(np.stack([region_crop(vols[0][0], regions, i, cfg.out_size) for i in pick]))
        return views(crops[:, None], generator)

    seconds = timed(region_views, 3)
    rows["separeg view pairs/s"] = BATCH / seconds

    batch = vp_views([vols[0][0]], BATCH, generator)
    unet = UNet3D(1, 2, width=WIDTH)
    head = VectorHead(unet.encoder_channels[1:])
    optimiser = torch.optim.AdamW([*unet.parameters(), *head.parameters()], lr=1e-4)

    def vp_step() -> None:
        features = unet.encode(batch.inputs)
        terms = {**vector_losses(head(features), batch.vectors),
                 **boundary_losses(unet.decode(features), batch.clean, batch.boundary)}
        optimiser.zero_grad()
        sum(terms.values()).backward()
        optimiser.step()

    rows["vectorpose step s (width 0.125, batch 8)"] = timed(vp_step, 3)

    v1, v2 = region_views()
    shared = SiameseBranch(UNet3D(1, 1, width=WIDTH), hidden=512, out=128)
    opt_shared = torch.optim.SGD(shared.parameters(), lr=0.05, momentum=0.9)
    rows["separeg simsiam step s (width 0.125, batch 8)"] = timed(lambda: simsiam_step(shared, opt_shared, v1, v2), 3)
    expert = make_experts(shared, 1)[0]
    student = SiameseBranch(UNet3D(1, 1, width=WIDTH), hidden=512, out=128)
    opt_student = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    rows["separeg distillation step s (width 0.125, batch 8)"] = timed(
        lambda: distillation_step(student, [expert, shared], opt_student, v1, v2), 3)

    width = max(len(k) for k in rows)
    for key, value in rows.items():
        print(f"{key:<{width}}  {value:8.3f}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "threads": 1,
                               "torch": torch.__version__, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
