"""Views/s of each Taleb et al. baseline's generator and its train-step time against SAR's, one CPU thread.

For 3D-Rot, 3D-RPL, 3D-Jig and 3D-CPC: how many cubes per second the view
generator turns into training views (one thread, as a loader worker or the
training process would), and the median time of a whole training step (views,
encoder, head, loss, backward, SGD) at the demo's width 0.125 and batch 8.
SAR's step at the same width and batch is timed in the same process, steps
interleaved, so machine load hits every method alike. ``gen/step`` is the
generator's share of a step: the most a loader would make the step wait if
views were made in the training process. Prints one line per method and writes
``benchmarks/out/taleb_methods.json``.

    python benchmarks/taleb_methods.py [--steps 6] [--batch 8] [--width 0.125]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sar3d.networks import UNet3D
from sar3d.pretraining.methods import cpc, jigsaw, rotation, rpl
from sar3d.pretraining.methods.patches import PatchTaskConfig, PretextNet, check_head, scaled

OUT = Path(__file__).resolve().parent / "out" / "taleb_methods.json"
CUBE = (64, 64, 32)


def taleb_method(kind: str, width: float) -> tuple[Any, Callable[[nn.Module], nn.Module], Callable[..., dict]]:
    """``(views, head builder, terms)`` of one method at its default settings."""
    if kind == "rotation":
        cfg = rotation.RotationConfig()
        return (rotation.RotationViews(CUBE, cfg.side),
                lambda u: rotation.RotationHead(u.encoder_channels[-1], cfg.side,
                                                check_head(cfg.hidden, width, 10, kind)),
                rotation.rotation_loss)
    if kind in ("rpl", "jigsaw"):
        task = PatchTaskConfig()
        n_classes, make_head = (rpl.N_NEIGHBOURS, rpl.rpl_head) if kind == "rpl" else (100, jigsaw.jigsaw_head)
        views = rpl.RPLViews(CUBE, task.patch) if kind == "rpl" else jigsaw.JigsawViews(CUBE, task.patch)
        return (views,
                lambda u: make_head(u.encoder_channels[-1], task.patch, scaled(task.embed, width),
                                    check_head(task.hidden, width, n_classes, kind)),
                rpl.rpl_loss if kind == "rpl" else jigsaw.jigsaw_loss)
    cfg = cpc.CPCConfig()
    return (cpc.CPCViews(CUBE, cfg.crop, cfg.patch_crop, cfg.flip),
            lambda u: cpc.CPCHead(u.encoder_channels[-1], [c // cpc.GRID for c in CUBE],
                                  scaled(cfg.code, width), scaled(cfg.context, width)),
            cpc.cpc_terms)


def generator_rate(views: Any, cubes: torch.Tensor, repeats: int) -> float:
    """Cubes per second turned into views (median over ``repeats`` batches)."""
    times = []
    for i in range(repeats):
        generator = torch.Generator().manual_seed(i)
        start = time.perf_counter()
        views(cubes, generator)
        times.append(time.perf_counter() - start)
    return len(cubes) / statistics.median(times)


def sar_step(width: float, batch: int) -> Callable[[torch.Tensor, int], None]:
    """One SAR training step (corruption in the process, discriminator and generator steps)."""
    from sar3d import pretrain
    from sar3d.config import load_config
    from sar3d.transforms import GenesisConfig, GenesisTransform

    config = load_config(Path(__file__).resolve().parents[1] / "config.yaml",
                         {"pretrain": {"width": width, "batch_size": batch}})
    spec, device = pretrain.method_spec("sar"), torch.device("cpu")
    models = pretrain.build_models(config, spec, device)
    optimizers = pretrain.build_optimizers(config, models)
    ctx = pretrain.StepContext(spec, dict(config["pretrain"]["loss_weights"]), device)
    transform = GenesisTransform(GenesisConfig.from_config(config["pretrain"]["transforms"]))
    labels = torch.arange(batch) % 3, torch.arange(batch) % 2

    def step(cubes: torch.Tensor, seed: int) -> None:
        x_hat, target = transform(cubes, torch.Generator().manual_seed(seed))
        pretrain.train_step(models, optimizers, ctx, x_hat, target, *labels)

    return step


def taleb_step(kind: str, width: float) -> tuple[Any, Callable[[torch.Tensor, int], None]]:
    """The generator and one training step of a Taleb et al. method (views made in the step)."""
    views, build_head, terms = taleb_method(kind, width)
    torch.manual_seed(0)
    unet = UNet3D(width=width)
    net = PretextNet(unet, build_head(unet))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

    def step(cubes: torch.Tensor, seed: int) -> None:
        optimizer.zero_grad(set_to_none=True)
        inputs, target = views(cubes, torch.Generator().manual_seed(seed))
        loss = next(v for k, v in terms(net(inputs), target).items() if k.startswith("loss_"))
        loss.backward()
        optimizer.step()

    return views, step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per method (after one warm-up)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--width", type=float, default=0.125)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cubes = torch.rand((args.batch, 1, *CUBE), generator=torch.Generator().manual_seed(0))
    kinds = ["rotation", "rpl", "jigsaw", "cpc"]
    steps: dict[str, Callable[[torch.Tensor, int], None]] = {"sar": sar_step(args.width, args.batch)}
    rates: dict[str, float] = {}
    for kind in kinds:
        views, steps[kind] = taleb_step(kind, args.width)
        rates[kind] = generator_rate(views, cubes, 20)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(args.steps + 1):  # interleaved, so load changes hit every method alike
        for name, step in steps.items():
            start = time.perf_counter()
            step(cubes, i)
            if i:  # the first step warms up allocations
                times[name].append(time.perf_counter() - start)
    step_s = {name: statistics.median(t) for name, t in times.items()}
    rows = [{"method": kind, "views_per_s": rates[kind], "generator_ms_per_batch": 1e3 * args.batch / rates[kind],
             "step_s": step_s[kind], "step_vs_sar": step_s[kind] / step_s["sar"],
             "generator_share_of_step": args.batch / rates[kind] / step_s[kind]} for kind in kinds]
    print(f"width {args.width}, batch {args.batch}, 1 CPU thread; SAR step {step_s['sar']:.3f} s")
    print(f"{'method':9s} {'views/s':>9s} {'gen ms/batch':>13s} {'step (s)':>9s} {'step/SAR':>9s} {'gen/step':>9s}")
    for r in rows:
        print(f"{r['method']:9s} {r['views_per_s']:9.0f} {r['generator_ms_per_batch']:13.2f} {r['step_s']:9.3f} "
              f"{r['step_vs_sar']:9.2f} {r['generator_share_of_step']:9.1%}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"torch": torch.__version__, "machine": platform.processor() or platform.machine(),
                               "width": args.width, "batch": args.batch, "steps": args.steps,
                               "sar_step_s": step_s["sar"], "rows": rows}, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
