"""Devices and precision: CUDA paths (mixed precision, ``channels_last_3d``, pinned memory,
non-blocking copies) written for real, but inert on CPU unless asked; CPU runs stay bit-reproducible.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
from typing import Any

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")



def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one is an error, not a silent fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch.cuda.is_available() is False")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {name!r} (auto | cpu | cuda)")
    return torch.device(name)


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the OS (Linux; else a no-op).

    Why: a batch of cubes is ~16 MB per tensor, above glibc's mmap threshold, so
    every temporary is a fresh mapping that page-faults on first touch; on one
    CPU thread that tripled the cost of the intensity lookup. This is what the
    PyTorch CPU tuning advice gets from preloading jemalloc/tcmalloc. Returns
    whether the setting took.
    """
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameter numbers from <malloc.h>
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, 1 << 30))


def set_determinism() -> None:
    """Same config => same numbers on CPU; on CUDA, deterministic kernels where they exist."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    if torch.cuda.is_available():  # pragma: no cover - needs a GPU
        torch.backends.cudnn.benchmark = False


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for full precision.

    ``auto`` means bf16 on a CUDA device that supports it (fp16 otherwise) and
    full precision on CPU, so CPU runs are bit-reproducible by default.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r} ({' | '.join(PRECISIONS)})")
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16  # pragma: no cover
    return torch.bfloat16 if precision == "bf16" else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    """Mixed-precision context; a no-op when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """Loss scaling is only needed for fp16 on CUDA; elsewhere the scaler is disabled (a pass-through)."""
    enabled = device.type == "cuda" and dtype == torch.float16
    return torch.amp.GradScaler(device.type, enabled=enabled)


def prepare_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move to the device; on CUDA use ``channels_last_3d``, which the 3D conv kernels prefer."""
    model = model.to(device)
    if device.type == "cuda":  # pragma: no cover - needs a GPU
        model = model.to(memory_format=torch.channels_last_3d)
    return model


def to_device(tensor: torch.Tensor, device: torch.device, volume: bool = True) -> torch.Tensor:
    """Non-blocking copy (pinned memory makes it asynchronous); 5D volumes go ``channels_last_3d`` on CUDA."""
    if device.type != "cuda":
        return tensor.to(device)
    out = tensor.to(device, non_blocking=True)  # pragma: no cover - needs a GPU
    if volume and out.dim() == 5:  # pragma: no cover
        out = out.contiguous(memory_format=torch.channels_last_3d)
    return out  # pragma: no cover


def pin_memory_default(device: torch.device) -> bool:
    return device.type == "cuda"
