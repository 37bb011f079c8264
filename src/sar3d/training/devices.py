"""Devices, precision and memory format: CUDA paths (mixed precision, pinned memory, non-blocking
copies) written for real, but inert on CPU unless asked; CPU runs stay bit-reproducible.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
from typing import Any

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")



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


def set_determinism(device: torch.device) -> None:
    """Same config => same numbers: on CUDA, deterministic kernels where they exist.

    Why CUDA only: the CPU kernels these jobs run give the same numbers run to run at
    a fixed thread count (tests/test_resume.py, tests/test_pretrain.py), and the switch
    imports ``torch._dynamo`` (~1.5 s), which an evaluation job would pay for nothing.
    """
    if device.type == "cuda":  # pragma: no cover - needs a GPU
        torch.use_deterministic_algorithms(True, warn_only=True)
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


def resolve_memory_format(name: str = "auto") -> torch.memory_format:
    """The layout of 5D weights (and so of every 3D convolution's activations).

    ``auto`` is ``channels_last_3d`` on every device: cuDNN prefers it, and so do
    oneDNN's CPU kernels (a width-0.125 U-Net step on 8 cubes of 64x64x32, one CPU
    thread: 4.5 s contiguous, 2.5 s channels-last; docs/performance.md).
    ``contiguous`` reproduces runs recorded in the default layout; the two differ
    in float rounding only.
    """
    if name not in MEMORY_FORMATS:
        raise ValueError(f"unknown memory format {name!r} ({' | '.join(MEMORY_FORMATS)})")
    return torch.contiguous_format if name == "contiguous" else torch.channels_last_3d


def prepare_model(model: torch.nn.Module, device: torch.device, memory_format: str = "auto") -> torch.nn.Module:
    """Move to the device in the configured memory format.

    Only the 5D weights change layout; convolutions then produce channels-last
    activations from any input, so batches need no conversion.
    """
    return model.to(device=device, memory_format=resolve_memory_format(memory_format))


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy to ``device``; non-blocking on CUDA (pinned memory makes it asynchronous)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.to(device, non_blocking=True)  # pragma: no cover - needs a GPU


def pin_memory_default(device: torch.device) -> bool:
    return device.type == "cuda"
