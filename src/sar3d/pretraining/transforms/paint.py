"""In- and out-painting: random boxes filled with (or kept out of) uniform noise, batched."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sar3d.pretraining.transforms.draws import check_batch, rand, randint_inclusive, shape3
from sar3d.pretraining.transforms.settings import GenesisConfig

PAINT_CONTINUE = 0.95
"""Reference probability of adding one more in-/out-painting box."""

OUTPAINT_EXTRA_BOXES = 4
"""Reference maximum number of kept boxes after the first one in out-painting."""

PAINT_MARGIN = 3
"""Reference minimum distance of a painting box from the cube border (voxels)."""

NO_PAINT, INPAINT, OUTPAINT = 0, 1, 2


def _box_draws(
    n: int, k: int, dims: Tensor, lo: Tensor, hi: Tensor, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Origins and sizes (n, k, 3) of boxes with sizes in [lo, hi], kept >= 3 voxels from the border."""
    u = rand((n, k, 6), generator, dims.device)
    sizes = randint_inclusive(lo, hi, u[..., :3]).clamp(1, None)
    sizes = torch.minimum(sizes, dims)
    o_lo = torch.minimum(torch.full_like(sizes, PAINT_MARGIN), dims - sizes)
    o_hi = torch.maximum(dims - sizes - PAINT_MARGIN, o_lo)
    return randint_inclusive(o_lo, o_hi, u[..., 3:]), sizes


def _pad_boxes(boxes: Tensor, k: int) -> Tensor:
    """Pad dim 1 (boxes) with zeros up to ``k`` entries (a padded box is inactive / empty)."""
    pad = [0, 0] * (boxes.dim() - 2) + [0, k - boxes.shape[1]]
    return torch.nn.functional.pad(boxes, pad)


def paint_masks(
    n: int, shape: tuple[int, int, int], generator: torch.Generator, cfg: GenesisConfig, device: torch.device | str
) -> tuple[Tensor, Tensor]:
    """Where each cube gets noise: ``(mask (n, X, Y, Z) bool, kind (n,) int64)``.

    ``kind`` is 0 (untouched, prob ``1 - paint_rate``), 1 (in-painting: noise in
    1 to ``inpaint_max_boxes`` boxes of 1/6 to 1/3 of each side) or 2
    (out-painting: noise everywhere except 1 to 5 kept boxes whose sides are the
    cube side minus 3/7 to 4/7 of it). Further boxes are added while
    ``rand < 0.95``, as in the reference.
    """
    device = torch.device(device)
    dims = torch.tensor(shape, device=device)
    u = rand((n, 2), generator, device)
    painted = u[:, 0] < cfg.paint_rate
    inpaint = painted & (u[:, 1] < cfg.inpaint_rate)
    kind = torch.where(painted, torch.where(inpaint, INPAINT, OUTPAINT), NO_PAINT)

    k_in, k_out = cfg.inpaint_max_boxes, 1 + OUTPAINT_EXTRA_BOXES
    in_orig, in_size = _box_draws(n, k_in, dims, dims // 6, dims // 3, generator)
    in_active = torch.cumprod((rand((n, k_in), generator, device) < PAINT_CONTINUE).long(), 1).bool()
    out_orig, out_size = _box_draws(n, k_out, dims, dims - 4 * dims // 7, dims - 3 * dims // 7, generator)
    more = rand((n, k_out - 1), generator, device) < PAINT_CONTINUE
    out_active = torch.cat((torch.ones((n, 1), dtype=torch.bool, device=device),
                            torch.cumprod(more.long(), 1).bool()), 1)

    # one set of boxes per cube: its in-painting boxes or its out-painting boxes (none if unpainted)
    k = max(k_in, k_out)
    sel = inpaint.view(n, 1, 1)
    origins = torch.where(sel, _pad_boxes(in_orig, k), _pad_boxes(out_orig, k))
    sizes = torch.where(sel, _pad_boxes(in_size, k), _pad_boxes(out_size, k))
    active = torch.where(sel[..., 0], _pad_boxes(in_active, k), _pad_boxes(out_active, k)) & painted.view(n, 1)

    # union of separable boxes: each axis position holds a bit per box containing it, so a voxel is
    # in some box iff the AND of its three axis words is non-zero (one uint8 op per voxel)
    axes = [torch.arange(s, device=device) for s in shape]
    union = torch.zeros((n, *shape), dtype=torch.bool, device=device)
    for first in range(0, k, 8):
        box = slice(first, min(first + 8, k))
        bit = (1 << torch.arange(box.stop - box.start, device=device)).view(1, -1, 1)
        words = [
            (((axes[a] >= origins[:, box, a, None]) & (axes[a] < (origins[:, box, a] + sizes[:, box, a])[..., None])
              & active[:, box, None]) * bit).sum(1).to(torch.uint8)
            for a in range(3)
        ]  # each (n, dim_a)
        both = (words[0][:, :, None] & words[1][:, None, :]).unsqueeze(3)
        union |= (both & words[2][:, None, None, :]).bool()
    mask = union.logical_xor_((kind == OUTPAINT).view(n, 1, 1, 1))  # out-painting: noise outside the boxes
    return mask, kind


def uniform_noise(shape: tuple[int, ...], generator: torch.Generator, device: torch.device | str,
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """Uniform noise on the grid ``{k / 65536}`` in [0, 1): four values per 64-bit random draw.

    A float32 ``torch.rand`` spends one Mersenne-Twister draw per voxel and made
    painting the costliest transform; 16 bits of resolution are far below
    anything the restoration task can see.
    """
    numel = math.prod(shape)
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None,
                                                                                    generator=generator)
    work = torch.promote_types(dtype, torch.float32)
    noise = words.view(torch.int16)[:numel].to(work).mul_(2.0**-16).add_(0.5)
    return noise.reshape(shape).to(dtype)


def paint(cubes: Tensor, generator: torch.Generator, cfg: GenesisConfig) -> Tensor:
    """In-/out-paint: replace the voxels of :func:`paint_masks` with uniform noise in [0, 1)."""
    check_batch(cubes, generator)
    mask, _ = paint_masks(cubes.shape[0], shape3(cubes), generator, cfg, cubes.device)
    # a full noise field is cheaper than counting the mask and scattering fewer values
    noise = uniform_noise(tuple(cubes.shape), generator, cubes.device, cubes.dtype)
    return torch.where(mask.unsqueeze(1), noise, cubes)
