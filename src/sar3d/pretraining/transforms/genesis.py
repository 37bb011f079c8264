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
  :data:`SHUFFLE_BANK` uniform permutations per window volume, so it is exactly
  uniform, but windows that draw the same bank entry are permuted alike (see
  :func:`shuffle_in_windows`); the overwrite by later windows is resolved for
  all windows at once (a scatter-max), not window by window;
* painting noise is uniform on the grid ``{k / 65536}`` (four values per 64-bit
  random draw, :func:`uniform_noise`), drawn for every voxel of the batch;
* the Bezier curve is tabulated on a uniform grid of :data:`LUT_SIZE` points
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

import dataclasses
import math
from collections.abc import Callable, Mapping
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
    "uniform_noise",
]

LUT_SIZE = 4096
"""Entries of the per-cube intensity lookup table (uniform grid on [0, 1])."""

BEZIER_POINTS = 1025
"""Points at which the Bezier curve is evaluated before tabulation (2049 gave the same LUT error)."""

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
    uniform over the positions where the window fits. The size triple is one
    exact uniform draw over all triples (which is the same as independent
    uniform sides) to spend one random number instead of three.
    """
    device = torch.device(device)
    sizes_of, last_origin_of = _window_classes(shape, tuple(int(m) for m in max_window), device)
    cls = torch.randint(0, sizes_of.shape[0], (n, n_windows), generator=generator, device=device)
    last = last_origin_of[cls]
    origins = torch.minimum((_rand((n, n_windows, 3), generator, device) * (last + 1)).long(), last)
    return origins, sizes_of[cls]


@lru_cache(maxsize=32)
def _window_classes(
    shape: tuple[int, int, int], max_window: tuple[int, int, int], device: torch.device
) -> tuple[Tensor, Tensor]:
    """Size triple and largest origin of every window class, (classes, 3) each; classes in C order."""
    cap = [min(m, d) for m, d in zip(max_window, shape, strict=True)]
    grid = torch.meshgrid(*(torch.arange(1, c + 1) for c in cap), indexing="ij")
    sizes = torch.stack(grid, dim=-1).reshape(-1, 3)
    return sizes.to(device), (torch.tensor(shape) - sizes).to(device)


SHUFFLE_BANK = 64
"""Random permutations drawn per call for each window volume (see :func:`shuffle_in_windows`)."""


@dataclass(frozen=True)
class _ShuffleTables:
    """Constant index tables for one (cube shape, largest window, bank size); built once, cached.

    A window *class* is its size triple, numbered ``((sx-1)*my + sy-1)*mz + sz-1``;
    its ``n_c`` voxels are listed in C order (local index ``j``). A (destination
    ``j``, source ``j'``) pair is packed into one integer
    ``(flat(j') - flat(j) + bias) << off_bits | flat(j)``, flat offsets being
    relative to the window origin: the destination, and the displacement to the
    source made non-negative by ``bias``.
    """

    off_bits: int
    disp_bits: int
    bias: int
    cls_first: Tensor  # (classes,) first local-index slot of each class in the concatenated list
    cls_volume: Tensor  # (classes,) n_c
    bank: Tensor  # (K * sum n_c,) row start in ``pairs`` of each (class, bank entry, j) slot
    bank_perm: Tensor  # same length: where that slot's source j' sits among the drawn permutations
    pairs: Tensor  # (sum n_c^2,) packed pairs per class, row j, column j'
    volumes: tuple[int, ...]  # distinct window volumes, the order permutations are drawn in


@lru_cache(maxsize=32)
def _shuffle_tables(
    shape: tuple[int, int, int], max_window: tuple[int, int, int], bank_size: int, device: torch.device
) -> _ShuffleTables:
    _, y, z = shape
    mx, my, mz = max_window
    bias = (mx - 1) * y * z + (my - 1) * z + mz - 1  # the largest flat offset inside a window
    off_bits, disp_bits = bias.bit_length(), (2 * bias + 1).bit_length()
    sizes = [(sx, sy, sz) for sx in range(1, mx + 1) for sy in range(1, my + 1) for sz in range(1, mz + 1)]
    volumes = sorted({sx * sy * sz for sx, sy, sz in sizes})
    perm_start = dict(zip(volumes, torch.tensor([0, *volumes[:-1]]).cumsum(0).mul(bank_size).tolist(), strict=True))
    pairs, bank, bank_perm, pair_first = [], [], [], 0
    for sx, sy, sz in sizes:
        n_c = sx * sy * sz
        ii, jj, kk = torch.meshgrid(torch.arange(sx), torch.arange(sy), torch.arange(sz), indexing="ij")
        offset = (ii * (y * z) + jj * z + kk).reshape(-1)
        pairs.append((((offset.unsqueeze(0) - offset.unsqueeze(1) + bias) << off_bits) | offset.unsqueeze(1))
                     .reshape(-1))
        j = torch.arange(n_c).repeat(bank_size)
        bank.append(pair_first + j * n_c)
        bank_perm.append(perm_start[n_c] + torch.arange(bank_size).repeat_interleave(n_c) * n_c + j)
        pair_first += n_c * n_c
    volume = torch.tensor([sx * sy * sz for sx, sy, sz in sizes])
    dtype = torch.int32 if off_bits + disp_bits <= 31 else torch.int64
    return _ShuffleTables(
        off_bits=off_bits, disp_bits=disp_bits, bias=bias,
        cls_first=(volume.cumsum(0) - volume).to(device), cls_volume=volume.to(device),
        bank=torch.cat(bank).to(device), bank_perm=torch.cat(bank_perm).to(device),
        pairs=torch.cat(pairs).to(device=device, dtype=dtype), volumes=tuple(volumes),
    )


def _permutation_bank(tables: _ShuffleTables, bank_size: int, generator: torch.Generator) -> Tensor:
    """Packed (destination, source) pairs of ``bank_size`` uniform permutations per window class.

    Slot ``K * cls_first[c] + k * n_c + j`` says where voxel ``j`` of a class-``c``
    window using bank entry ``k`` takes its value from. Permutations are drawn per
    window *volume* (argsort of float64 uniforms: ties have probability ~1e-12) and
    applied to the C-order voxel list of every class of that volume.
    """
    device = tables.pairs.device
    perms = torch.cat([
        torch.rand((bank_size, n), generator=generator, device=device, dtype=torch.float64).argsort(1).reshape(-1)
        for n in tables.volumes
    ])
    return tables.pairs.index_select(0, tables.bank + perms.index_select(0, tables.bank_perm))


def shuffle_in_windows(
    cubes: Tensor, origins: Tensor, sizes: Tensor, generator: torch.Generator, bank_size: int = SHUFFLE_BANK
) -> Tensor:
    """Permute the voxels of each given window (windows read the original cube; later ones win).

    ``origins``/``sizes`` are (B, W, 3) as from :func:`shuffle_windows`; all
    channels of a cube share the permutation.

    Why it is fast: each window takes a random entry of a per-call bank of
    ``bank_size`` uniform permutations per window volume (:func:`_permutation_bank`),
    so every window's permutation is exactly uniform, but windows drawing the same
    entry (or of another shape with the same volume) are permuted alike. That
    correlation between distant windows carries no information a restoration
    network could use, and it avoids sorting every (window, voxel) pair. Then,
    cube by cube (its voxels stay in cache), every (window, voxel) pair gets one
    packed integer ``(window rank + 1) << disp_bits | displacement`` that is
    scatter-maxed onto its voxel: the latest window wins, and the displacement
    points at the voxel's source in the *original* cube.
    """
    _check(cubes, generator)
    b, c = cubes.shape[:2]
    shape = _shape3(cubes)
    n_vox = shape[0] * shape[1] * shape[2]
    n_win = origins.shape[1]
    if b == 0 or n_win == 0:
        return cubes.clone()
    device = cubes.device
    maxw = tuple(int(v) for v in sizes.reshape(-1, 3).amax(0).tolist())
    tables = _shuffle_tables(shape, maxw, bank_size, device)
    bank = _permutation_bank(tables, bank_size, generator)
    entry = torch.randint(0, bank_size, (b, n_win), generator=generator, device=device)

    cls = ((sizes[..., 0] - 1) * maxw[1] + sizes[..., 1] - 1) * maxw[2] + sizes[..., 2] - 1
    vol = tables.cls_volume[cls]  # (b, n_win)
    seg_end = vol.cumsum(1)
    # bank slot of each window's first voxel, minus the position of that voxel in the cube's pair list
    shift = (tables.cls_first[cls] * bank_size + entry * vol - (seg_end - vol)).to(bank.dtype)
    base = (origins[..., 0] * (shape[1] * shape[2]) + origins[..., 1] * shape[2] + origins[..., 2]).to(bank.dtype)
    fits = n_win < (1 << (31 - tables.disp_bits)) and bank.dtype == torch.int32
    key_dtype = torch.int32 if fits else torch.int64
    rank = torch.arange(n_win, device=device, dtype=key_dtype)
    pair_index = torch.arange(int(seg_end[:, -1].max()), device=device, dtype=bank.dtype)
    voxels = torch.arange(n_vox, device=device, dtype=key_dtype)
    disp_mask, off_mask = (1 << tables.disp_bits) - 1, (1 << tables.off_bits) - 1
    flat = cubes.reshape(b, c, n_vox)
    out = torch.empty_like(flat)
    for i, n_pairs in enumerate(seg_end[:, -1].tolist()):
        win = torch.repeat_interleave(rank, vol[i], output_size=n_pairs)
        packed = bank.index_select(0, shift[i].index_select(0, win).add_(pair_index[:n_pairs]))
        voxel = base[i].index_select(0, win).add_(packed & off_mask).long()
        key = ((win + 1) << tables.disp_bits).bitwise_or_((packed >> tables.off_bits).to(key_dtype))
        winner = torch.full((n_vox,), tables.bias, dtype=key_dtype, device=device)  # rank 0, displacement 0
        winner.scatter_reduce_(0, voxel, key, reduce="amax")
        source = winner.bitwise_and_(disp_mask).add_(voxels).sub_(tables.bias)
        torch.index_select(flat[i], 1, source, out=out[i])
    return out.reshape(cubes.shape)


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


def _apply_gated(cubes: Tensor, chosen: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """``fn`` on the cubes at indices ``chosen``, the others unchanged.

    When most cubes are chosen, running ``fn`` on the whole batch and copying the
    few others back is cheaper than selecting and re-inserting the many.
    """
    n = cubes.shape[0]
    if chosen.numel() == 0:
        return cubes.clone()
    if 2 * chosen.numel() < n:
        return cubes.clone().index_copy_(0, chosen, fn(cubes.index_select(0, chosen)))
    out = fn(cubes)
    keep = torch.ones(n, dtype=torch.bool, device=cubes.device).index_fill_(0, chosen, False).nonzero().squeeze(1)
    return out.index_copy_(0, keep, cubes.index_select(0, keep)) if keep.numel() else out


def nonlinear_intensity(cubes: Tensor, generator: torch.Generator, cfg: GenesisConfig) -> Tensor:
    """With probability ``nonlinear_rate`` per cube, remap intensities through a random Bezier curve."""
    _check(cubes, generator)
    idx = _gate(cubes.shape[0], cfg.nonlinear_rate, generator, cubes.device)

    def remap(chosen: Tensor) -> Tensor:
        lut, _ = bezier_lookup_tables(chosen.shape[0], generator, cfg.nonlinear_inverse_rate, cubes.device)
        return apply_lookup_table(chosen, lut)

    return _apply_gated(cubes, idx, remap)


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
    _check(cubes, generator)
    mask, _ = paint_masks(cubes.shape[0], _shape3(cubes), generator, cfg, cubes.device)
    # a full noise field is cheaper than counting the mask and scattering fewer values
    noise = uniform_noise(tuple(cubes.shape), generator, cubes.device, cubes.dtype)
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
