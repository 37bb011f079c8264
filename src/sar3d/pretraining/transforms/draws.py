"""Random draws and checks shared by the batched corruptions: every draw from the caller's generator."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def check_batch(cubes: Tensor, generator: torch.Generator) -> None:
    """A (B, C, X, Y, Z) batch and a generator on its device, or a ValueError saying which is wrong."""
    if cubes.dim() != 5:
        raise ValueError(f"expected cubes of shape (B, C, X, Y, Z), got {tuple(cubes.shape)}")
    if generator.device.type != cubes.device.type:
        raise ValueError(f"generator is on {generator.device} but the cubes are on {cubes.device}")


def rand(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> Tensor:
    """Uniforms on [0, 1) from ``generator`` on ``device``."""
    return torch.rand(shape, generator=generator, device=device)


def randint_inclusive(low: Tensor, high: Tensor, u: Tensor) -> Tensor:
    """Map uniforms ``u`` to integers in [low, high] (element-wise bounds), like ``random.randint``."""
    span = (high - low + 1).clamp_min(1)
    return low + torch.minimum((u * span).long(), span - 1)


def gate(n: int, rate: float, generator: torch.Generator, device: torch.device) -> Tensor:
    """Indices of the cubes a transform with probability ``rate`` applies to (one draw per cube)."""
    return torch.nonzero(rand((n,), generator, device) < rate).squeeze(1)


def shape3(cubes: Tensor) -> tuple[int, int, int]:
    """The spatial size (X, Y, Z) of a batch."""
    return int(cubes.shape[2]), int(cubes.shape[3]), int(cubes.shape[4])


def apply_gated(cubes: Tensor, chosen: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
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
