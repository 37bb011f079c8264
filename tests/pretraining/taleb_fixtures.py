"""Helpers shared by the tests of the Taleb et al. baselines (not a conftest: tests/pretraining's belongs to the seam).

Phantom cubes with real anatomy for the "loss falls" checks, cubes whose every
voxel value is unique so a patch can be traced back to where it was cut, one
short training loop, and the study path: config validation, a pre-training job
through the run loop and the fine-tuning init it exports.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from cubeshards import cube_folder
from sar3d.config import ConfigError, load_config
from sar3d.data.cubes import cut_cubes
from sar3d.data.normalise import minmax_to_unit
from sar3d.data.phantom import generate_case
from sar3d.finetuning.run import init_model
from sar3d.nets.unet import ENCODER_PREFIXES, UNet3D
from sar3d.pretraining import registry
from sar3d.pretraining.base import PretrainJob
from sar3d.pretraining.run import run_pretrain

REPO = Path(__file__).resolve().parents[2]
CUBE = (64, 64, 32)
WIDTH = 0.125


@lru_cache(maxsize=1)
def phantom_cubes() -> Tensor:
    """16 cubes ``(16, 1, 64, 64, 32)`` in [0, 1] from two chest-CT phantom volumes, all three scales."""
    out = []
    for index in range(2):
        image, _, affine = generate_case("chest_ct", 7, index)
        volume = minmax_to_unit(np.asarray(image, dtype=np.float32), -1000.0, 1000.0, (0.0, 99.5))
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        cubes, _ = cut_cubes(volume, spacing, (2, 2, 4), (0.5, 0.25, 0.125), CUBE, 0.05,
                             np.random.default_rng(index))
        out.append(cubes)
    return torch.from_numpy(np.concatenate(out)).unsqueeze(1)


def unique_cubes(batch: int, seed: int = 0) -> Tensor:
    """Cubes ``(batch, 1, 64, 64, 32)`` in [0, 1) whose voxel values are all distinct (across the batch too)."""
    n = batch * int(np.prod(CUBE))
    values = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).double() / n
    return values.reshape(batch, 1, *CUBE)


def locate(cubes: Tensor, patch: Tensor) -> tuple[int, tuple[int, int, int]]:
    """``(volume, corner)`` where ``patch`` (C, *size) was cut from ``cubes``, checked voxel for voxel."""
    hits = (cubes == patch[0, 0, 0, 0]).nonzero().tolist()
    assert len(hits) == 1, "voxel values are not unique"
    b, _, x, y, z = hits[0]
    sx, sy, sz = patch.shape[1:]
    assert torch.equal(cubes[b, :, x:x + sx, y:y + sy, z:z + sz], patch)
    return b, (x, y, z)


def cell_of(corner: Sequence[int], size: Sequence[int], grid: Sequence[int]) -> tuple[int, ...]:
    """The grid cell that wholly contains a box (the grid centred in the cube, cells ``CUBE // grid``)."""
    cell = []
    for c, s, g, n in zip(corner, size, grid, CUBE, strict=True):
        side = n // g
        margin = (n - side * g) // 2
        index = (c - margin) // side
        assert 0 <= index < g and c + s <= margin + (index + 1) * side, "box crosses a cell border"
        cell.append(index)
    return tuple(cell)


def draws_are_seeded_and_cover(views: Any, batch: int, n_classes: int) -> Tensor:
    """Draw ``batch`` views' parameters twice from one seed: identical, every label seen; returns the corners."""
    corners, labels = views.randomize(batch, torch.Generator().manual_seed(0))
    assert set(labels.tolist()) == set(range(n_classes))
    again = views.randomize(batch, torch.Generator().manual_seed(0))
    assert torch.equal(corners, again[0]) and torch.equal(labels, again[1])
    return corners


def small_unet(seed: int = 0) -> UNet3D:
    torch.manual_seed(seed)
    return UNet3D(width=WIDTH)


def train(modules: Sequence[nn.Module], loss: Callable[[], Tensor], steps: int, lr: float = 1e-3) -> list[float]:
    """``steps`` Adam steps on ``loss()`` (which runs the modules); the loss before each step."""
    params = [p for m in modules for p in m.parameters()]
    optimizer = torch.optim.Adam(params, lr=lr)
    history = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        value = loss()
        value.backward()
        optimizer.step()
        history.append(float(value.detach()))
    return history


FALL = 0.7
"""A loss "falls" when the mean of its last steps is at most this fraction of the mean of its first steps."""


def assert_falls(history: Sequence[float], window: int = 4) -> None:
    """The mean of the last ``window`` values is at most :data:`FALL` times that of the first ``window``."""
    start, end = float(np.mean(history[:window])), float(np.mean(history[-window:]))
    assert end <= FALL * start, f"loss went from {start:.4f} to {end:.4f}: {[round(h, 4) for h in history]}"


def study_config(root: Path, **pretrain: Any) -> dict[str, Any]:
    """config.yaml (which carries the four blocks) at demo width on CPU, one epoch of two batches of 4."""
    return load_config(REPO / "config.yaml", {
        "results_dir": str(root / "results"),
        "tracking": {"uri": f"sqlite:///{root}/mlflow.db", "experiment": "taleb"},
        "pretrain": {"width": WIDTH, "batch_size": 4, "epochs": 1, "steps_per_epoch": 2, "val_steps": 1,
                     "device": "cpu", **pretrain},
    })


def config_error(cubes: dict[str, Any] | None = None, **pretrain: Any) -> str:
    """The message of the :class:`ConfigError` that ``cubes`` and ``pretrain`` overrides raise at validation."""
    try:
        load_config(REPO / "config.yaml", {"cubes": cubes or {}, "pretrain": pretrain})
    except ConfigError as err:
        return str(err)
    raise AssertionError(f"{pretrain} was accepted")


def phantom_shards(root: Path) -> list[Path]:
    """A CT and an "MRI" shard of the 16 phantom cubes at 64x64x32 (3/4 train, 1/4 validation)."""
    shards = []
    for modality, name in enumerate(("ct", "mri")):
        folder = cube_folder(root / name, name, modality, 16, modality)
        np.save(folder / "cubes.npy", phantom_cubes()[:, 0].numpy())
        manifest = json.loads((folder / "manifest.json").read_text())
        (folder / "manifest.json").write_text(json.dumps({**manifest, "size": list(CUBE)}))
        shards.append(folder)
    return shards


def assert_pretrains_and_hands_over_the_encoder_only(name: str, term: str, root: Path) -> dict[str, Any]:
    """Pre-train block ``name`` through the run loop; fine-tuning gets its encoder and a fresh decoder.

    Every epoch's training ``term`` and validation objective are finite. Fresh:
    equal to the seeded decoder of fine-tuning from scratch, and not the
    pre-training U-Net's (which, frozen, kept its own seeded init). Returns the
    checkpoint's per-epoch history.
    """
    config = study_config(root)
    out, checkpoint = root / f"{name}.pt", root / f"{name}_ckpt.pt"
    run_pretrain(config, PretrainJob(name, tuple(phantom_shards(root / "cubes")), out, checkpoint))
    history = torch.load(checkpoint, weights_only=True)["history"]
    assert all(np.isfinite(h[f"train/{term}"]) and np.isfinite(h["val/objective"]) for h in history)
    state = torch.load(out, weights_only=True)
    assert state and all(k.startswith(ENCODER_PREFIXES) for k in state)
    pretrained = registry.build(config, name, torch.device("cpu")).unet.state_dict()
    tuned, _ = init_model(config, "brain_tumour", name, 0, out)
    scratch, _ = init_model(config, "brain_tumour", "scratch", 0, None)
    decoder = [k for k in tuned.state_dict() if not k.startswith(ENCODER_PREFIXES)]
    assert decoder
    for key, value in tuned.state_dict().items():
        if key.startswith(ENCODER_PREFIXES):
            assert torch.equal(value, state[key]), key
        else:
            assert torch.equal(value, scratch.state_dict()[key]), key
    weights = [k for k in decoder if k.endswith("conv1.weight") and k in pretrained]
    assert weights and all(not torch.equal(tuned.state_dict()[k], pretrained[k]) for k in weights)
    return history
