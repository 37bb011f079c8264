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
which changes what is drawn in distribution:

* each window's permutation and the overwrite by later windows are resolved
  for all windows at once (a sort and a scatter-max), not window by window;
* in-painting boxes get independent uniform noise from one field per cube
  (each voxel still receives a fresh U(0, 1) value);
* the Bezier curve is tabulated on a uniform grid of :data:`LUT_SIZE` points
  and applied by linear interpolation (max deviation from ``np.interp`` on the
  reference's 100,000 points is ~1e-4);
* the inverted curve pairs the sorted x values with the *sorted, reversed* y
  values, so it is exactly anti-monotone (the reference pairs them with the
  unsorted y values, which equals this whenever the Bezier curve is monotone).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "LUT_SIZE",
    "GenesisConfig",
    "GenesisTransform",
    "apply_lookup_table",
    "bezier_lookup_tables",
    "flip_parities",
    "local_pixel_shuffle",
    "nonlinear_intensity",
    "paint",
    "paint_masks",
    "random_flip",
    "shuffle_in_windows",
    "shuffle_windows",
]

LUT_SIZE = 4096
"""Entries of the per-cube intensity lookup table (uniform grid on [0, 1])."""

BEZIER_POINTS = 2049
"""Points at which the Bezier curve is evaluated before tabulation."""

PAINT_CONTINUE = 0.95
"""Reference probability of adding one more in-/out-painting box."""

OUTPAINT_EXTRA_BOXES = 4
"""Reference maximum number of kept boxes after the first one in out-painting."""

MAX_FLIPS = 3
"""Reference maximum number of successive random flips."""

PAINT_MARGIN = 3
"""Reference minimum distance of a painting box from the cube border (voxels)."""

NO_PAINT, INPAINT, OUTPAINT = 0, 1, 2


@dataclass(frozen=True)
class GenesisConfig:
    """The transform probabilities and sizes; fields are exactly ``pretrain.transforms``'s keys."""

    flip_rate: float = 0.4
    local_shuffle_rate: float = 0.5
    local_shuffle_windows: int = 10000
    local_shuffle_max_window: tuple[int, int, int] = (6, 6, 3)
    nonlinear_rate: float = 0.9
    nonlinear_inverse_rate: float = 0.5
    paint_rate: float = 0.9
    inpaint_rate: float = 0.2
    inpaint_max_boxes: int = 5

    def __post_init__(self) -> None:
        object.__setattr__(self, "local_shuffle_max_window", tuple(int(v) for v in self.local_shuffle_max_window))
        for name in ("flip_rate", "local_shuffle_rate", "nonlinear_rate", "nonlinear_inverse_rate",
                     "paint_rate", "inpaint_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"GenesisConfig.{name} must be in [0, 1], got {value}")
        if len(self.local_shuffle_max_window) != 3 or min(self.local_shuffle_max_window) < 1:
            raise ValueError(f"GenesisConfig.local_shuffle_max_window must be 3 positive ints, "
                             f"got {self.local_shuffle_max_window}")
        if self.local_shuffle_windows < 0:
            raise ValueError("GenesisConfig.local_shuffle_windows must be >= 0")
        if self.inpaint_max_boxes < 1:
            raise ValueError("GenesisConfig.inpaint_max_boxes must be >= 1")

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> GenesisConfig:
        """Build from ``config["pretrain"]["transforms"]``; unknown keys are an error, missing ones default."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(section) - names)
        if unknown:
            raise ValueError(f"unknown pretrain.transforms key(s) {unknown}; known: {sorted(names)}")
        return cls(**{k: section[k] for k in names if k in section})


# --------------------------------------------------------------------------- helpers


def _check(cubes: Tensor, generator: torch.Generator) -> None:
    if cubes.dim() != 5:
        raise ValueError(f"expected cubes of shape (B, C, X, Y, Z), got {tuple(cubes.shape)}")
    if generator.device.type != cubes.device.type:
        raise ValueError(f"generator is on {generator.device} but the cubes are on {cubes.device}")


def _rand(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> Tensor:
    return torch.rand(shape, generator=generator, device=device)


def _randint_inclusive(low: Tensor, high: Tensor, u: Tensor) -> Tensor:
    """Map uniforms ``u`` to integers in [low, high] (element-wise bounds), like ``random.randint``."""
    span = (high - low + 1).clamp_min(1)
    return low + torch.minimum((u * span).long(), span - 1)


def _gate(n: int, rate: float, generator: torch.Generator, device: torch.device) -> Tensor:
    """Indices of the cubes a transform with probability ``rate`` applies to (one draw per cube)."""
    return torch.nonzero(_rand((n,), generator, device) < rate).squeeze(1)


def _shape3(cubes: Tensor) -> tuple[int, int, int]:
    return int(cubes.shape[2]), int(cubes.shape[3]), int(cubes.shape[4])


# --------------------------------------------------------------------------- flip


def flip_parities(n: int, generator: torch.Generator, flip_rate: float, device: torch.device | str) -> Tensor:
    """(n, 3) bool: whether each axis ends up flipped.

    Reference: while ``rand < flip_rate`` (at most 3 times) flip a random axis;
    flipping an axis twice undoes it, so only the parity per axis matters.
    """
    device = torch.device(device)
    u = _rand((n, MAX_FLIPS), generator, device)
    axis = (_rand((n, MAX_FLIPS), generator, device) * 3).long().clamp_max(2)
    active = torch.cumprod((u < flip_rate).long(), dim=1)
    counts = torch.zeros((n, 3), dtype=torch.long, device=device).scatter_add_(1, axis, active)
    return counts % 2 == 1


def random_flip(cubes: Tensor, generator: torch.Generator, cfg: GenesisConfig) -> Tensor:
    """Flip each cube along random axes (applied to both the input and the restoration target)."""
    _check(cubes, generator)
    parity = flip_parities(cubes.shape[0], generator, cfg.flip_rate, cubes.device)
    out = cubes.clone()
    for axis in range(3):
        idx = torch.nonzero(parity[:, axis]).squeeze(1)
        if idx.numel():
            out.index_copy_(0, idx, out.index_select(0, idx).flip(axis + 2))
    return out


# --------------------------------------------------------------------------- local pixel shuffling


def shuffle_windows(
    n: int,
    shape: tuple[int, int, int],
    generator: torch.Generator,
    n_windows: int,
    max_window: tuple[int, int, int],
    device: torch.device | str,
) -> tuple[Tensor, Tensor]:
    """Draw ``n_windows`` windows per cube: origins and sizes, each (n, n_windows, 3) int64.

    Sizes are uniform in [1, max_window] per axis (the reference uses
    ``dim // 10``: (6, 6, 3) for 64x64x32), clipped to the cube; origins are
    uniform over the positions where the window fits.
    """
    device = torch.device(device)
    dims = torch.tensor(shape, device=device)
    maxw = torch.minimum(torch.tensor(max_window, device=device), dims).clamp_min(1)
    u = _rand((n, n_windows, 6), generator, device)
    sizes = _randint_inclusive(torch.ones_like(maxw), maxw, u[..., :3])
    origins = _randint_inclusive(torch.zeros_like(sizes), dims - sizes, u[..., 3:])
    return origins, sizes


@lru_cache(maxsize=32)
def _window_offsets(
    shape: tuple[int, int, int], max_window: tuple[int, int, int], device: torch.device
) -> tuple[Tensor, Tensor]:
    """Flat voxel offsets of every window shape, concatenated, and each shape's start in that table.

    Shape class of (sx, sy, sz) is ``((sx-1)*my + sy-1)*mz + sz-1``; the offsets
    of a class list the window's voxels in C order relative to its origin.
    """
    _, y, z = shape
    mx, my, mz = max_window
    pieces, starts, start = [], [], 0
    for sx in range(1, mx + 1):
        for sy in range(1, my + 1):
            for sz in range(1, mz + 1):
                ii, jj, kk = torch.meshgrid(
                    torch.arange(sx), torch.arange(sy), torch.arange(sz), indexing="ij"
                )
                pieces.append((ii * (y * z) + jj * z + kk).reshape(-1))
                starts.append(start)
                start += sx * sy * sz
    return torch.cat(pieces).to(device), torch.tensor(starts, device=device)


def _shuffle_source_map(
    origins: Tensor,
    sizes: Tensor,
    shape: tuple[int, int, int],
    maxw: tuple[int, int, int],
    generator: torch.Generator,
) -> Tensor:
    """For one cube: the flat index each voxel takes its value from after all windows.

    Every (window, voxel) pair is enumerated at once; pair ``p`` is voxel
    ``vox[p]`` of window ``win[p]``, windows in order. A window's permutation is
    the order in which its pairs appear in one random ordering of all pairs
    (exactly uniform, independent across windows). The overwrite rule (later
    windows win, every window reads the original cube) is a scatter-max of
    (window rank, source) over destination voxels.
    """
    device = origins.device
    x, y, z = shape
    n_vox = x * y * z
    table, starts = _window_offsets(shape, maxw, device)
    n_win = sizes.shape[0]
    vol = sizes.prod(1)
    n_pairs = int(vol.sum())
    seg_start = torch.cumsum(vol, 0) - vol
    cls = ((sizes[:, 0] - 1) * maxw[1] + sizes[:, 1] - 1) * maxw[2] + sizes[:, 2] - 1
    base = origins[:, 0] * (y * z) + origins[:, 1] * z + origins[:, 2]
    win = torch.repeat_interleave(torch.arange(n_win, device=device, dtype=torch.int32), vol, output_size=n_pairs)
    shift = (starts[cls] - seg_start).index_select(0, win)
    vox = base.index_select(0, win) + table.index_select(0, shift.add_(torch.arange(n_pairs, device=device)))

    # Visit the pairs in a uniformly random order, then stable-sort by window: each
    # window's pairs come out in random order. Small window ids sort ~2x faster.
    perm = torch.randperm(n_pairs, generator=generator, device=device)
    key = win.index_select(0, perm)
    if n_win <= torch.iinfo(torch.int16).max:
        key = key.to(torch.int16)
    src = vox.index_select(0, perm.index_select(0, torch.sort(key, stable=True).indices))

    vox_bits = max(1, (n_vox - 1).bit_length())
    srcmap = torch.arange(n_vox, device=device)
    srcmap.scatter_reduce_(0, vox, (win.long() + 1).mul_(1 << vox_bits).add_(src), reduce="amax")
    return srcmap.bitwise_and_((1 << vox_bits) - 1)


def shuffle_in_windows(cubes: Tensor, origins: Tensor, sizes: Tensor, generator: torch.Generator) -> Tensor:
    """Permute the voxels of each given window (windows read the original cube; later ones win).

    ``origins``/``sizes`` are (B, W, 3) as from :func:`shuffle_windows`; all
    channels of a cube share the permutation.
    """
    _check(cubes, generator)
    b, c = cubes.shape[:2]
    shape = _shape3(cubes)
    n_vox = shape[0] * shape[1] * shape[2]
    if b == 0 or origins.shape[1] == 0:
        return cubes.clone()
    maxw = tuple(int(v) for v in sizes.reshape(-1, 3).amax(0).tolist())
    srcmap = torch.stack([_shuffle_source_map(origins[i], sizes[i], shape, maxw, generator) for i in range(b)])
    flat = cubes.reshape(b, c, n_vox)
    return torch.gather(flat, 2, srcmap.unsqueeze(1).expand(b, c, n_vox)).reshape(cubes.shape)


def local_pixel_shuffle(cubes: Tensor, generator: torch.Generator, cfg: GenesisConfig) -> Tensor:
    """With probability ``local_shuffle_rate`` per cube, shuffle voxels inside random small windows."""
    _check(cubes, generator)
    idx = _gate(cubes.shape[0], cfg.local_shuffle_rate, generator, cubes.device)
    out = cubes.clone()
    if idx.numel() == 0 or cfg.local_shuffle_windows == 0:
        return out
    origins, sizes = shuffle_windows(
        idx.numel(), _shape3(cubes), generator, cfg.local_shuffle_windows, cfg.local_shuffle_max_window,
        cubes.device,
    )
    out.index_copy_(0, idx, shuffle_in_windows(cubes.index_select(0, idx), origins, sizes, generator))
    return out


# --------------------------------------------------------------------------- non-linear intensity


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
    ctrl = _rand((n, 4), generator, device)  # x1, y1, x2, y2
    inverted = _rand((n,), generator, device) < inverse_rate
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
    """Map intensities through per-cube tables (values clamped to [0, 1], linear interpolation)."""
    b = cubes.shape[0]
    size = lut.shape[1]
    flat = cubes.reshape(b, -1).float()
    pos = flat.clamp(0, 1).mul_(size - 1)
    i0 = pos.to(torch.int64).clamp_(max=size - 2)
    frac = pos.sub_(i0)
    slope = lut.diff(dim=1)
    out = lut.gather(1, i0).addcmul_(frac, slope.gather(1, i0))
    return out.reshape(cubes.shape).to(cubes.dtype)


def nonlinear_intensity(cubes: Tensor, generator: torch.Generator, cfg: GenesisConfig) -> Tensor:
    """With probability ``nonlinear_rate`` per cube, remap intensities through a random Bezier curve."""
    _check(cubes, generator)
    idx = _gate(cubes.shape[0], cfg.nonlinear_rate, generator, cubes.device)
    out = cubes.clone()
    if idx.numel():
        lut, _ = bezier_lookup_tables(idx.numel(), generator, cfg.nonlinear_inverse_rate, cubes.device)
        out.index_copy_(0, idx, apply_lookup_table(cubes.index_select(0, idx), lut))
    return out


# --------------------------------------------------------------------------- in-/out-painting


def _box_draws(
    n: int, k: int, dims: Tensor, lo: Tensor, hi: Tensor, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Origins and sizes (n, k, 3) of boxes with sizes in [lo, hi], kept >= 3 voxels from the border."""
    u = _rand((n, k, 6), generator, dims.device)
    sizes = _randint_inclusive(lo, hi, u[..., :3]).clamp(1, None)
    sizes = torch.minimum(sizes, dims)
    o_lo = torch.minimum(torch.full_like(sizes, PAINT_MARGIN), dims - sizes)
    o_hi = torch.maximum(dims - sizes - PAINT_MARGIN, o_lo)
    return _randint_inclusive(o_lo, o_hi, u[..., 3:]), sizes


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
    u = _rand((n, 2), generator, device)
    painted = u[:, 0] < cfg.paint_rate
    inpaint = painted & (u[:, 1] < cfg.inpaint_rate)
    kind = torch.where(painted, torch.where(inpaint, INPAINT, OUTPAINT), NO_PAINT)

    k_in, k_out = cfg.inpaint_max_boxes, 1 + OUTPAINT_EXTRA_BOXES
    in_orig, in_size = _box_draws(n, k_in, dims, dims // 6, dims // 3, generator)
    in_active = torch.cumprod((_rand((n, k_in), generator, device) < PAINT_CONTINUE).long(), 1).bool()
    out_orig, out_size = _box_draws(n, k_out, dims, dims - 4 * dims // 7, dims - 3 * dims // 7, generator)
    more = _rand((n, k_out - 1), generator, device) < PAINT_CONTINUE
    out_active = torch.cat((torch.ones((n, 1), dtype=torch.bool, device=device),
                            torch.cumprod(more.long(), 1).bool()), 1)

    # one set of boxes per cube: its in-painting boxes or its out-painting boxes
    k = max(k_in, k_out)
    sel = inpaint.view(n, 1, 1)
    origins = torch.where(sel, _pad_boxes(in_orig, k), _pad_boxes(out_orig, k))
    sizes = torch.where(sel, _pad_boxes(in_size, k), _pad_boxes(out_size, k))
    active = torch.where(sel[..., 0], _pad_boxes(in_active, k), _pad_boxes(out_active, k)) & painted.view(n, 1)

    # union of separable boxes as one batched matmul of 0/1 indicators (exact small integer counts)
    axes = [torch.arange(s, device=device) for s in shape]
    inside = [
        ((axes[a] >= origins[..., a, None]) & (axes[a] < (origins[..., a] + sizes[..., a])[..., None])).float()
        for a in range(3)
    ]  # each (n, k, dim_a)
    in_xy = (inside[0].mul_(active[..., None]).unsqueeze(3) * inside[1].unsqueeze(2)).reshape(n, k, -1)
    union = torch.bmm(in_xy.transpose(1, 2), inside[2]).reshape(n, *shape) > 0.5
    mask = torch.where((kind == OUTPAINT).view(n, 1, 1, 1), ~union, union) & painted.view(n, 1, 1, 1)
    return mask, kind


def paint(cubes: Tensor, generator: torch.Generator, cfg: GenesisConfig) -> Tensor:
    """In-/out-paint: replace the voxels of :func:`paint_masks` with uniform noise in [0, 1)."""
    _check(cubes, generator)
    mask, _ = paint_masks(cubes.shape[0], _shape3(cubes), generator, cfg, cubes.device)
    # a full noise field is cheaper than counting the mask and scattering fewer values
    noise = torch.rand(cubes.shape, generator=generator, device=cubes.device, dtype=cubes.dtype)
    return torch.where(mask.unsqueeze(1), noise, cubes)


# --------------------------------------------------------------------------- pipeline


class GenesisTransform:
    """The full Models Genesis corruption: returns ``(input, target)`` for restoration training.

    ``target`` is the flipped original; ``input`` is the flipped cube after
    shuffling, the intensity curve and painting. Both keep the cubes' device
    and dtype; ``generator`` must live on the same device.
    """

    def __init__(self, cfg: GenesisConfig) -> None:
        self.cfg = cfg

    def __call__(self, cubes: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        _check(cubes, generator)
        target = random_flip(cubes, generator, self.cfg)
        x = local_pixel_shuffle(target, generator, self.cfg)
        x = nonlinear_intensity(x, generator, self.cfg)
        x = paint(x, generator, self.cfg)
        return x, target

    def __repr__(self) -> str:
        return f"GenesisTransform({self.cfg})"
