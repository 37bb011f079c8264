"""The segmentation U-Net of a task and its sliding-window inference (fine-tuning validation, evaluation)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from sar3d.training import devices


def build_segmenter(config: Mapping[str, Any], task: str) -> torch.nn.Module:
    """The fine-tuning U-Net of a task (one logit channel per class)."""
    from sar3d.nets.unet import UNet3D

    n_classes = len(config["tasks"][task]["classes"])
    return UNet3D(in_channels=1, out_channels=n_classes, width=config["pretrain"]["width"], final_activation=None)


@torch.no_grad()
def predict_logits(
    model: torch.nn.Module, image: np.ndarray, config: Mapping[str, Any], device: torch.device,
    amp: torch.dtype | None,
) -> torch.Tensor:
    """Sliding-window logits ``(C, X, Y, Z)`` (float32, CPU) of one ``(1, X, Y, Z)`` volume."""
    from monai.inferers import sliding_window_inference

    x = devices.to_device(torch.as_tensor(image)[None].float(), device)
    with devices.autocast(device, amp):
        logits = sliding_window_inference(
            x,
            roi_size=tuple(config["finetune"]["patch_size"]),
            sw_batch_size=config["evaluate"]["sw_batch_size"],
            predictor=model,
            overlap=config["evaluate"]["overlap"],
            mode="gaussian",
        )
    return torch.as_tensor(logits)[0].float().cpu()
