"""Models Genesis: restore the clean cube from its Genesis corruption (the paper's baseline and SAR's base).

Views: the batched corruption of :mod:`sar3d.pretraining.transforms.genesis`
(``x_hat``) and the flipped clean cube (``target``). Loss:
``w_res * MSE(U-Net(x_hat), target)``, which is also the validation objective.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from sar3d.pretraining import losses
from sar3d.pretraining.base import Batch, PretrainMethod, Terms
from sar3d.pretraining.registry import register
from sar3d.pretraining.transforms.genesis import GenesisTransform
from sar3d.pretraining.transforms.settings import GenesisConfig

RESTORATION_WEIGHTS = {
    "type": "object",
    "additionalProperties": False,
    "default": {},
    "description": "Weights of the loss terms in the minimised sum (and the validation objective).",
    "properties": {
        "restoration": {"type": "number", "minimum": 0, "default": 10.0,
                        "description": "Weight of the restoration MSE."},
    },
}


@register
class Genesis(PretrainMethod):
    """Models Genesis restoration on the shared U-Net."""

    kind = "genesis"
    display = "Genesis"
    rank = 10.0
    shared_keys = ("transforms",)
    block_schema: ClassVar[dict[str, Any]] = {"loss_weights": RESTORATION_WEIGHTS}

    def __init__(self, name: str, config: Mapping[str, Any], device: torch.device) -> None:
        super().__init__(name, config, device)
        self.transform = GenesisTransform(GenesisConfig.from_config(self.settings["transforms"]))
        self.weights: dict[str, float] = dict(self.block["loss_weights"])

    def make_views(self, batch: Batch, generator: torch.Generator) -> Batch:
        """``x_hat`` (corrupted) and ``target`` (flipped clean cube) in place of ``cube``."""
        rest = {k: v for k, v in batch.items() if k != "cube"}
        x_hat, target = self.transform(batch["cube"], generator)
        return {"x_hat": x_hat, "target": target, **rest}

    def forward(self, net: nn.Module, batch: Batch) -> Any:
        return net(batch["x_hat"])

    def losses(self, outputs: Any, batch: Batch) -> tuple[torch.Tensor, Terms]:
        terms: Terms = {"loss_res": losses.restoration(outputs, batch["target"])}
        terms["objective"] = self.weights["restoration"] * terms["loss_res"]
        terms["loss_total"] = terms["objective"]
        return terms["loss_total"], {k: v.detach() for k, v in terms.items()}
