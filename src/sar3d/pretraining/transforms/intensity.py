"""The non-linear intensity transform: a random Bezier curve per cube, tabulated and applied by lookup."""

from __future__ import annotations

import torch
from torch import Tensor

from sar3d.pretraining.transforms.draws import apply_gated, check_batch, gate, rand
from sar3d.pretraining.transforms.settings import GenesisConfig

LUT_SIZE = 4096
"""Entries of the per-cube intensity lookup table (uniform grid on [0, 1])."""

BEZIER_POINTS = 1025
"""Points at which the Bezier curve is evaluated before tabulation (2049 gave the same LUT error)."""


def bezier_lookup_tables(
    n: int, generator: torch.Generator, inverse_rate: float, device: torch.device | str, size: int = LUT_SIZE
) -> tuple[Tensor, Tensor]:
    """Per cube, a random cubic Bezier intensity curve tabulated on ``size`` points of [0, 1].

    The curve runs from (0, 0) to (1, 1) with two uniform random control points;
    x and y samples are sorted (as in the reference), giving a monotone map of
    [0, 1] onto [0, 1]; with probability ``inverse_rate`` it is reversed.
    Returns ``(lut (n, size) float32, inverted (n,) bool)``.
    """
    device = torch.device(device)
    ctrl = rand((n, 4), generator, device)  # x1, y1, x2, y2
    inverted = rand((n,), generator, device) < inverse_rate
    t = torch.linspace(0.0, 1.0, BEZIER_POINTS, device=device)
    b1, b2, b3 = 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t**2, t**3  # Bernstein weights; P0 = (0, 0)
    xs = (ctrl[:, 0:1] * b1 + ctrl[:, 2:3] * b2 + b3).sort(dim=1).values
    ys = (ctrl[:, 1:2] * b1 + ctrl[:, 3:4] * b2 + b3).sort(dim=1).values
    ys = torch.where(inverted.unsqueeze(1), ys.flip(1), ys)
    grid = torch.linspace(0.0, 1.0, size, device=device).expand(n, size).contiguous()
    hi = torch.searchsorted(xs, grid, right=True).clamp(1, BEZIER_POINTS - 1)
    x0, x1 = xs.gather(1, hi - 1), xs.gather(1, hi)
    y0, y1 = ys.gather(1, hi - 1), ys.gather(1, hi)
    w = torch.where(x1 > x0, (grid - x0) / (x1 - x0).clamp_min(1e-12), torch.ones_like(grid))
    return (y0 + w.clamp(0, 1) * (y1 - y0)).clamp(0, 1), inverted


def apply_lookup_table(cubes: Tensor, lut: Tensor) -> Tensor:
    """Map intensities through per-cube tables (values clamped to [0, 1], linear interpolation).

    All cubes' tables are looked up as one flat table with int32 indices: one
    ``index_select`` for the values and one for the slopes, instead of two
    row-wise gathers with int64 indices.
    """
    b = cubes.shape[0]
    size = lut.shape[1]
    lut = lut.float()
    pos = cubes.reshape(b, -1).float().clamp(0, 1).mul_(size - 1)
    index = pos.to(torch.int32).add_(torch.arange(0, b * size, size, device=lut.device, dtype=torch.int32)
                                     .unsqueeze(1)).reshape(-1)
    slope = torch.nn.functional.pad(lut.diff(dim=1), (0, 1)).reshape(-1)  # 0 after the last entry
    out = lut.reshape(-1).index_select(0, index).addcmul_(pos.frac_().reshape(-1), slope.index_select(0, index))
    return out.reshape(cubes.shape).to(cubes.dtype)


def nonlinear_intensity(cubes: Tensor, generator: torch.Generator, cfg: GenesisConfig) -> Tensor:
    """With probability ``nonlinear_rate`` per cube, remap intensities through a random Bezier curve."""
    check_batch(cubes, generator)
    idx = gate(cubes.shape[0], cfg.nonlinear_rate, generator, cubes.device)

    def remap(chosen: Tensor) -> Tensor:
        lut, _ = bezier_lookup_tables(chosen.shape[0], generator, cfg.nonlinear_inverse_rate, cubes.device)
        return apply_lookup_table(chosen, lut)

    return apply_gated(cubes, idx, remap)
