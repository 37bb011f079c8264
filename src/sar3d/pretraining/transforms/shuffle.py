"""Local pixel shuffling, batched: every window of every cube permuted with no per-window Python loop."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from sar3d.pretraining.transforms.draws import check_batch, gate, rand, shape3
from sar3d.pretraining.transforms.settings import GenesisConfig


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
    origins = torch.minimum((rand((n, n_windows, 3), generator, device) * (last + 1)).long(), last)
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
    check_batch(cubes, generator)
    b, c = cubes.shape[:2]
    shape = shape3(cubes)
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
    check_batch(cubes, generator)
    idx = gate(cubes.shape[0], cfg.local_shuffle_rate, generator, cubes.device)
    out = cubes.clone()
    if idx.numel() == 0 or cfg.local_shuffle_windows == 0:
        return out
    origins, sizes = shuffle_windows(
        idx.numel(), shape3(cubes), generator, cfg.local_shuffle_windows, cfg.local_shuffle_max_window,
        cubes.device,
    )
    out.index_copy_(0, idx, shuffle_in_windows(cubes.index_select(0, idx), origins, sizes, generator))
    return out
