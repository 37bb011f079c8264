"""Models Genesis image transforms, batched: (B, C, X, Y, Z) tensor ops on CPU or CUDA.

Models Genesis (and SAR after it) corrupts each cube with a random flip, local
pixel shuffling, a non-linear intensity curve and in-/out-painting, and trains
the U-Net to restore the (flipped) original. The public reference does this per
cube in Python loops (10,000 windows per shuffled cube), about 24 cubes/s; the
pre-training loop here would be input-bound at that speed, so every transform
works on the whole batch with a handful of tensor ops and no per-window loop.

Semantics follow the reference ``generate_pair`` (order: flip input and target →
shuffle → non-linear → paint input), with the probabilities from
``config["pretrain"]["transforms"]``. Every random draw comes from the
``torch.Generator`` the caller passes, which lives on the cubes' device, so the
same generator state gives the same output. Documented deviations, none of
which changes what a single window, voxel or cube receives in distribution:

* each window's permutation is drawn from a per-call bank of
  :data:`~sar3d.pretraining.transforms.shuffle.SHUFFLE_BANK` uniform permutations per window volume, so it is exactly
  uniform, but windows that draw the same bank entry are permuted alike (see
  :func:`~sar3d.pretraining.transforms.shuffle.shuffle_in_windows`); the overwrite by later windows is resolved for
  all windows at once (a scatter-max), not window by window;
* painting noise is uniform on the grid ``{k / 65536}`` (four values per 64-bit
  random draw, :func:`~sar3d.pretraining.transforms.paint.uniform_noise`), drawn for every voxel of the batch;
* the Bezier curve is tabulated on a uniform grid of :data:`~sar3d.pretraining.transforms.intensity.LUT_SIZE` points
  and applied by linear interpolation (deviation from ``np.interp`` on the
  reference's 100,000 points: typically ~1e-4, up to ~1e-2 where a curve is
  almost vertical);
* the inverted curve pairs the sorted x values with the *sorted, reversed* y
  values, so it is exactly anti-monotone (the reference pairs them with the
  unsorted y values, which equals this whenever the Bezier curve is monotone).

Speed (one CPU thread, see docs/performance.md): work is done cube by cube
where a whole-batch temporary would be tens of MB (page faults cost more than
the arithmetic), in int32 where values fit, and nothing loops per window.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sar3d.pretraining.transforms.draws import check_batch, rand
from sar3d.pretraining.transforms.intensity import nonlinear_intensity
from sar3d.pretraining.transforms.paint import paint
from sar3d.pretraining.transforms.settings import GenesisConfig
from sar3d.pretraining.transforms.shuffle import local_pixel_shuffle

__all__ = ["GenesisTransform", "flip_parities", "random_flip"]

MAX_FLIPS = 3
"""Reference maximum number of successive random flips."""


def flip_parities(n: int, generator: torch.Generator, flip_rate: float, device: torch.device | str) -> Tensor:
    """(n, 3) bool: whether each axis ends up flipped.

    Reference: while ``rand < flip_rate`` (at most 3 times) flip a random axis;
    flipping an axis twice undoes it, so only the parity per axis matters.
    """
    device = torch.device(device)
    u = rand((n, MAX_FLIPS), generator, device)
    axis = (rand((n, MAX_FLIPS), generator, device) * 3).long().clamp_max(2)
    active = torch.cumprod((u < flip_rate).long(), dim=1)
    counts = torch.zeros((n, 3), dtype=torch.long, device=device).scatter_add_(1, axis, active)
    return counts % 2 == 1


def random_flip(cubes: Tensor, generator: torch.Generator, cfg: GenesisConfig) -> Tensor:
    """Flip each cube along random axes (applied to both the input and the restoration target)."""
    check_batch(cubes, generator)
    parity = flip_parities(cubes.shape[0], generator, cfg.flip_rate, cubes.device)
    out = cubes.clone()
    for axis in range(3):
        idx = torch.nonzero(parity[:, axis]).squeeze(1)
        if idx.numel():
            out.index_copy_(0, idx, out.index_select(0, idx).flip(axis + 2))
    return out


class GenesisTransform:
    """The full Models Genesis corruption: returns ``(input, target)`` for restoration training.

    ``target`` is the flipped original; ``input`` is the flipped cube after
    shuffling, the intensity curve and painting. Both keep the cubes' device
    and dtype; ``generator`` must live on the same device.
    """

    def __init__(self, cfg: GenesisConfig) -> None:
        self.cfg = cfg

    def __call__(self, cubes: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        check_batch(cubes, generator)
        target = random_flip(cubes, generator, self.cfg)
        x = local_pixel_shuffle(target, generator, self.cfg)
        x = nonlinear_intensity(x, generator, self.cfg)
        x = paint(x, generator, self.cfg)
        return x, target

    def __repr__(self) -> str:
        return f"GenesisTransform({self.cfg})"
