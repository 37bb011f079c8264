"""Weight files: safe loading, nnU-Net-style transfer into a model, parameter counts."""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from sar3d.io import InputDataError

__all__ = ["count_parameters", "load_state_dict_file", "transfer_weights"]


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not; buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


def _strip_module_prefix(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop the ``module.`` prefix that ``nn.DataParallel`` checkpoints (Models Genesis) carry."""
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read a state dict safely (``weights_only``), unwrapping ``{"state_dict": ...}`` and ``module.``.

    Raises :class:`~sar3d.io.InputDataError` naming the file when it is not a
    readable state dict (including pickles that ``weights_only`` refuses).
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise InputDataError(path, "file does not exist") from err
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        raise InputDataError(path, f"not a weights-only state dict ({type(err).__name__}: {err})") from err
    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise InputDataError(path, f"expected a non-empty state dict, found {type(obj).__name__}")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise InputDataError(path, f"not a state dict: entries {bad[:5]} are not named tensors")
    return _strip_module_prefix(obj)


def transfer_weights(
    model: nn.Module, state_dict: Mapping[str, Tensor], exclude: Sequence[str] = ()
) -> list[str]:
    """Load every entry whose name and shape match ``model``; return the skipped names, sorted.

    nnU-Net-style transfer: a fine-tuning model with a different output class
    count keeps its freshly initialised ``out_tr.final_conv.*``; names starting
    with a prefix in ``exclude`` are skipped too. Raises when nothing matches,
    because that always means the wrong file or architecture.
    """
    own = model.state_dict()
    state_dict = _strip_module_prefix(state_dict)
    matched = {
        k: v for k, v in state_dict.items()
        if k in own and tuple(v.shape) == tuple(own[k].shape) and not k.startswith(tuple(exclude))
    }
    if not matched:
        raise ValueError(
            f"no entry of the state dict matches the model by name and shape "
            f"(state dict: {len(state_dict)} entries, e.g. {sorted(state_dict)[:3]}; "
            f"model: e.g. {sorted(own)[:3]})"
        )
    model.load_state_dict(matched, strict=False)
    return sorted(k for k in state_dict if k not in matched)
