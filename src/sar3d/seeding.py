"""Seeded random generators derived from the study seed and a job's identity.

Each job derives its own seed from the master seed and names (dataset, case,
method, fold...), so adding a fold or a dataset never changes the draws of
another job, and the same config gives the same numbers.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def derive_seed(master: int, *keys: object) -> int:
    """A 63-bit seed from the master seed and any number of identifying keys."""
    text = "/".join([str(master), *(str(k) for k in keys)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & ((1 << 63) - 1)


def numpy_rng(master: int, *keys: object) -> np.random.Generator:
    return np.random.default_rng(derive_seed(master, *keys))


def torch_generator(master: int, *keys: object, device: str | torch.device = "cpu") -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(master, *keys))
    return gen
