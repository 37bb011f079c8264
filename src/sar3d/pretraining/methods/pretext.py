"""The Taleb et al. (2020) baselines on the pre-training seam: what their method classes share.

:class:`PretextMethod` is an encoder-only pretext task (views of each cube, a
head on the shared encoder, one loss), the base of 3D-Rot and 3D-CPC;
:class:`PatchTaskMethod` adds what 3D-RPL and 3D-Jig share on top of it. The
config schemas of their blocks are here too; the views, heads and checks they
are built from are in :mod:`sar3d.pretraining.methods.patches`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from sar3d.grid import all_inits
from sar3d.nets.unet import ENCODER_PREFIXES
from sar3d.pretraining.base import ENCODER, Batch, PretrainMethod, Terms
from sar3d.pretraining.methods.patches import (
    GridTaskViews,
    PatchTaskConfig,
    PretextNet,
    SettingError,
    classification_terms,
    scaled,
)

__all__ = ["HEAD_SCHEMA", "PATCH_TASK_SCHEMA", "PatchTaskMethod", "PretextMethod"]

HEAD_SCHEMA: dict[str, Any] = {
    "hidden": {
        "type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 1, "default": [2048, 1024],
        "description": "Hidden widths of the classifier at U-Net width 1 (Taleb et al.'s big_fully), "
                       "scaled by pretrain.width like the U-Net's channels.",
    },
    "dropout": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.5,
                "description": "Dropout after each hidden layer of the classifier."},
}
PATCH_TASK_SCHEMA: dict[str, Any] = {
    "patch": {
        "type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 3, "maxItems": 3,
        "default": [16, 16, 8],
        "description": "Patch size: multiples of 8 (three poolings), a 3x3x3 grid of them inside cubes.size.",
    },
    "jitter": {"type": "boolean", "default": True,
               "description": "Place each patch anywhere inside its grid cell (false: centred)."},
    "embed": {"type": "integer", "minimum": 1, "default": 256,
              "description": "Per-patch code width at U-Net width 1 (scaled by pretrain.width)."},
    **HEAD_SCHEMA,
}


class PretextMethod(PretrainMethod):
    """An encoder-only pretext task: views of each cube, a head on the shared encoder, one loss.

    A subclass declares ``read`` (its settings from its block's own keys,
    raising :class:`SettingError` with the key) and ``term`` (the loss term that
    is minimised and chooses the checkpoint), and builds its views and head;
    its terms are a classifier's unless it overrides :meth:`terms`. The decoder
    never runs, so it is frozen (DDP skips frozen parameters) and not exported:
    fine-tuning starts from a fresh one, as the SAR paper fine-tunes these
    baselines.
    """

    export = ENCODER
    read: ClassVar[Any]  # (block, cube size, width, key) -> settings
    term: ClassVar[str]

    @classmethod
    def settings_of(cls, name: str, block: Mapping[str, Any], config: Mapping[str, Any]) -> Any:
        """The block's settings, checked against ``cubes.size`` and ``pretrain.width``."""
        own = {k: block[k] for k in cls.block_schema if k in block}
        return cls.read(own, config["cubes"]["size"], config["pretrain"]["width"], f"pretrain.methods.{name}")

    @classmethod
    def check(cls, name: str, block: Mapping[str, Any], config: Mapping[str, Any]) -> list[tuple[str, str]]:
        """Views and heads against ``cubes.size`` and ``pretrain.width`` when the study fine-tunes from the block.

        Only then does a job run it (the workflow pre-trains the inits'
        blocks); a config with smaller cubes need not delete the blocks it does
        not use. Building the method always checks.
        """
        if name not in all_inits(config):
            return []
        try:
            cls.settings_of(name, block, config)
        except SettingError as err:
            return [(err.key, err.message)]
        return []

    def __init__(self, name: str, config: Mapping[str, Any], device: torch.device) -> None:
        self.task = self.settings_of(name, config["pretrain"]["methods"][name], config)
        self.cube = tuple(int(c) for c in config["cubes"]["size"])
        super().__init__(name, config, device)
        for key, param in self.unet.named_parameters():
            if not key.startswith(ENCODER_PREFIXES):
                param.requires_grad_(False)
        self.views = self.build_views()

    def scaled(self, units: int) -> int:
        """A head width at this study's ``pretrain.width``."""
        return scaled(units, self.settings["width"])

    def hidden(self) -> list[int]:
        return [self.scaled(h) for h in self.task.hidden]

    def build_heads(self) -> dict[str, Any]:
        return {"head": lambda: self.build_head(self.unet.encoder_channels[-1])}

    def param_groups(self) -> list[dict[str, Any]]:
        """The encoder and the head at the optimiser's lr (the frozen decoder is left out)."""
        params = [p for p in (*self.unet.parameters(), *self.heads["head"].parameters()) if p.requires_grad]
        return [{"params": params, "lr": self.optimizer_settings()["lr"], "name": "unet"}]

    def network(self) -> nn.Module:
        return PretextNet(self.unet, self.heads["head"])

    def make_views(self, batch: Batch, generator: torch.Generator) -> Batch:
        """``views`` ``(B, N, 1, *size)`` and ``target`` (labels, or CPC's negatives) in place of ``cube``."""
        views, target = self.views(batch["cube"], generator)
        return {**{k: v for k, v in batch.items() if k != "cube"}, "views": views, "target": target}

    def forward(self, net: nn.Module, batch: Batch) -> Any:
        return net(batch["views"])

    def losses(self, outputs: Any, batch: Batch) -> tuple[Tensor, Terms]:
        terms = self.terms(outputs, batch["target"])
        loss = terms[self.term]
        terms["objective"] = terms["loss_total"] = loss
        return loss, {k: v.detach() for k, v in terms.items()}

    def build_views(self) -> Any:
        """The view generator: ``(cubes, generator) -> (views, target)``."""
        raise NotImplementedError(f"{type(self).__name__} must define build_views()")

    def build_head(self, channels: int) -> nn.Module:
        """The head on the encoder features of the views (``channels``: the deepest map's)."""
        raise NotImplementedError(f"{type(self).__name__} must define build_head()")

    def terms(self, outputs: Any, target: Tensor) -> Terms:
        """The logged terms of the head's outputs, :attr:`term` among them.

        By default a classifier's (:func:`classification_terms` named after :attr:`term`);
        CPC overrides it.
        """
        return classification_terms(outputs, target, self.term.removeprefix("loss_"))


class PatchTaskMethod(PretextMethod):
    """A patch classification task on the 3x3x3 grid (3D-RPL, 3D-Jig), set by :data:`PATCH_TASK_SCHEMA`.

    A subclass declares ``views_class`` (draws the patches and labels, knows the
    class count), ``head_factory`` (``(channels, patch, embed, hidden, dropout=)``
    -> classifier) and ``term``; settings, views and head follow from them.
    """

    block_schema: ClassVar[dict[str, Any]] = PATCH_TASK_SCHEMA
    views_class: ClassVar[type[GridTaskViews]]
    head_factory: ClassVar[Callable[..., nn.Module]]

    @classmethod
    def read(cls, block: Mapping[str, Any], cube: Sequence[int], width: float, key: str) -> PatchTaskConfig:
        return cls.views_class.settings(block, cube, width, key)

    def build_views(self) -> GridTaskViews:
        return self.views_class(self.cube, self.task.patch, self.task.jitter)

    def build_head(self, channels: int) -> nn.Module:
        return self.head_factory(channels, self.task.patch, self.scaled(self.task.embed), self.hidden(),
                                 dropout=self.task.dropout)
