"""SAR (paper eq. 3-4): Genesis restoration + the scale-aware head (SA) + the modality discriminator (MIAL).

A block switches terms off: ``adversarial: false`` is +SA, ``scale_loss: false``
is +MIAL, ``scales: [f]`` trains on the cubes of one scale only (Table 3; one
scale is one class, so those blocks set ``scale_loss: false``).

One step is the two-player game of eq. (3)-(4):

1. *Discriminator step* (:meth:`Sar.side_step`). The encoder's four feature maps,
   detached, go through the MIAL discriminator M;
   ``L_disc = BCE-with-logits(M(E(x_a)), modality)`` (positive = MRI) updates M
   only (SGD or Adam, fixed lr).
2. *Generator step.* ``w_res·L_res + w_scale·L_scale + w_adv·L_adv_enc`` updates
   the U-Net and the scale head (SGD), where ``L_res = MSE(U-Net(x̂), x)``,
   ``L_scale = CE(S(E(x_a)_deepest), scale)`` and
   ``L_adv_enc = BCE-with-logits(M(E(x_a)), 1 - modality)``: the encoder is
   trained to make M call CT "MRI" and MRI "CT". This flipped-label form is the
   usual non-saturating replacement for minimising ``-L_disc`` (GANs, ADDA): it
   has the same fixed point (M at chance) but does not vanish when M is
   confident, which is exactly when the encoder needs a gradient. M's weights
   are frozen during this step, so only the encoder learns from it.

``x_a``, what the auxiliary heads see, is the clean cube x by default
(``aux_view: clean``) and the corrupted x̂ with ``corrupted`` (the paper's
wording): out-painting noise hides scale and modality (docs/deviations.md).

Model selection follows ``objective = w_res·L_res + w_scale·L_scale``, the
self-supervised objective without the adversarial term, so GAN dynamics never
choose the checkpoint; the adversarial terms, M's accuracy and the encoder's
confusion are logged apart.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from fractions import Fraction
from typing import Any, ClassVar

import torch
from torch import nn

from sar3d.data.scales import scale_index
from sar3d.nets.heads import ModalityDiscriminator, ScaleHead
from sar3d.pretraining import losses
from sar3d.pretraining.base import MAIN, SCALE_ABLATION, Batch, StepTools, Terms, make_optimizer
from sar3d.pretraining.methods.genesis import RESTORATION_WEIGHTS, Genesis
from sar3d.pretraining.registry import register
from sar3d.training.devices import autocast

POSITIVE = {"type": "number", "exclusiveMinimum": 0}


class GeneratorNet(nn.Module):
    """U-Net and scale head as one module whose ``forward`` returns all a step needs.

    Why: ``DistributedDataParallel`` only synchronises gradients of what runs
    through the wrapped module's ``forward``, and a step needs the encoder
    features, the restoration and the scale logits at once.
    """

    def __init__(self, unet: nn.Module, scale_head: nn.Module | None) -> None:
        super().__init__()
        self.unet = unet
        self.scale_head = scale_head

    def forward(
        self, x_hat: torch.Tensor, x_aux: torch.Tensor | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor | None]:
        """Restoration of ``x_hat``; the auxiliary heads' features come from ``x_aux`` when given.

        Returns ``(auxiliary features, restoration, scale logits)``: the features
        the scale head and the discriminator see (those of ``x_aux``, else of ``x_hat``).
        """
        feats = self.unet.encode(x_hat)
        aux = feats if x_aux is None else self.unet.encode(x_aux)
        logits = self.scale_head(aux[-1]) if self.scale_head is not None else None
        return aux, self.unet.decode(feats), logits


@register
class Sar(Genesis):
    """SAR and its ablations (+SA, +MIAL, single-scale) through one code path."""

    kind = "sar"
    display = "SAR"
    rank = 80.0
    block_schema: ClassVar[dict[str, Any]] = {
        "scales": {
            "type": ["array", "null"], "items": POSITIVE, "minItems": 1, "default": None,
            "description": "Cube scales trained on (fractions of cubes.scales); null = every scale.",
        },
        "scale_loss": {"type": "boolean", "default": True, "description": "Train the scale head (SA)."},
        "adversarial": {"type": "boolean", "default": True, "description": "Train against the discriminator (MIAL)."},
        "loss_weights": {
            **RESTORATION_WEIGHTS,
            "description": "Weights of the loss terms: restoration and scale make the validation objective; "
                           "the adversarial term is added to it for training.",
            "properties": {
                **RESTORATION_WEIGHTS["properties"],
                "scale": {"type": "number", "minimum": 0, "default": 1.0, "description": "Weight of the scale CE."},
                "adversarial": {"type": "number", "minimum": 0, "default": 1.0,
                                "description": "Weight of the encoder's adversarial BCE."},
            },
        },
        "lr": {
            "type": "object", "additionalProperties": False, "default": {},
            "description": "Learning rates of the heads (the U-Net's is the optimizer's lr).",
            "properties": {
                "scale_head": {**POSITIVE, "default": 0.1, "description": "Scale head lr (follows the plateau)."},
                "discriminator": {**POSITIVE, "default": 0.001,
                                  "description": "Discriminator lr, fixed: it never follows the plateau."},
            },
        },
        "discriminator_optimizer": {
            "type": "string", "enum": ["sgd", "adam"], "default": "sgd",
            "description": "Optimiser of the discriminator (paper: SGD with the U-Net's momentum).",
        },
        "aux_view": {
            "type": "string", "enum": ["clean", "corrupted"], "default": "clean",
            "description": (
                "What the scale head and the discriminator see: the clean cube (one more encoder pass per "
                "step; out-painting noise hides scale and modality, docs/deviations.md) or the corrupted "
                "input, as the paper writes. Restoration always sees the corrupted input."
            ),
        },
    }

    # ------------------------------------------------------------------ declarations

    @classmethod
    def display_name(cls, block: Mapping[str, Any]) -> str:
        if block["scales"] is not None and len(block["scales"]) == 1:
            return f"SAR ({Fraction(block['scales'][0]).limit_denominator()} only)"
        if not block["adversarial"]:
            return "+ SA"
        return "SAR" if block["scale_loss"] else "+ MIAL"

    @classmethod
    def table_rank(cls, block: Mapping[str, Any]) -> float:
        """+MIAL, +SA, SAR (the paper's order), then the single-scale blocks from the largest scale."""
        if cls.role(block) == SCALE_ABLATION:
            return cls.rank + 10.0 - block["scales"][0]
        if block["scale_loss"] and block["adversarial"]:
            return cls.rank
        return cls.rank - (5.0 if block["scale_loss"] else 10.0)

    @classmethod
    def role(cls, block: Mapping[str, Any]) -> str:
        return SCALE_ABLATION if block["scales"] is not None and len(block["scales"]) == 1 else MAIN

    @classmethod
    def check(cls, name: str, block: Mapping[str, Any], config: Mapping[str, Any]) -> list[tuple[str, str]]:
        key = f"pretrain.methods.{name}"
        errors = []
        for fraction in block["scales"] or []:
            try:
                scale_index(config["cubes"]["scales"], fraction)
            except ValueError:
                errors.append((f"{key}.scales", f"{fraction} is not in 'cubes.scales' {config['cubes']['scales']}"))
        if block["scale_loss"] and len(block["scales"] or config["cubes"]["scales"]) < 2:
            errors.append((f"{key}.scale_loss", "one scale is one class, so the scale loss is always 0; set it false"))
        return errors

    # ------------------------------------------------------------------ models

    def build_heads(self) -> dict[str, Callable[[], nn.Module]]:
        channels = list(self.unet.encoder_channels)
        heads: dict[str, Callable[[], nn.Module]] = {}
        if self.block["scale_loss"]:
            heads["scale_head"] = lambda: ScaleHead(channels[-1], n_classes=len(self.config["cubes"]["scales"]))
        if self.block["adversarial"]:
            heads["discriminator"] = lambda: ModalityDiscriminator(channels)
        return heads

    @property
    def scale_head(self) -> nn.Module | None:
        return self.heads.get("scale_head")

    @property
    def discriminator(self) -> nn.Module | None:
        return self.heads.get("discriminator")

    def network(self) -> nn.Module:
        return GeneratorNet(self.unet, self.scale_head)

    def wrapped_apart(self) -> dict[str, nn.Module]:
        return {"discriminator": self.discriminator} if self.discriminator is not None else {}

    def param_groups(self) -> list[dict[str, Any]]:
        groups = super().param_groups()
        if self.scale_head is not None:
            groups.append({"params": list(self.scale_head.parameters()), "lr": self.block["lr"]["scale_head"],
                           "name": "scale_head"})
        return groups

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """The generator's optimiser, and the discriminator's own at a fixed lr."""
        optimizers = super().optimizers()
        if self.discriminator is not None:
            lr = self.block["lr"]["discriminator"]
            group = [{"params": list(self.discriminator.parameters()), "lr": lr, "name": "discriminator"}]
            settings = {**self.optimizer_settings(), "name": self.block["discriminator_optimizer"], "lr": lr}
            optimizers["discriminator"] = make_optimizer(settings, group)
        return optimizers

    # ------------------------------------------------------------------ data

    def cube_scales(self) -> list[int] | None:
        """Positions in ``cubes.scales`` of the block's scales; None = all."""
        if self.block["scales"] is None:
            return None
        return [scale_index(self.config["cubes"]["scales"], fraction) for fraction in self.block["scales"]]

    # ------------------------------------------------------------------ the step

    def forward(self, net: nn.Module, batch: Batch) -> Any:
        has_aux = self.scale_head is not None or self.discriminator is not None
        x_aux = batch["target"] if has_aux and self.block["aux_view"] == "clean" else None
        return net(batch["x_hat"], x_aux)

    def side_step(self, outputs: Any, batch: Batch, tools: StepTools) -> Terms:
        """The discriminator's step on the detached encoder features."""
        if self.discriminator is None:
            return {}
        feats = outputs[0]
        opt = tools.optimizers["discriminator"]
        opt.zero_grad(set_to_none=True)
        with autocast(tools.device, tools.amp):
            loss_disc, logits = losses.binary_logit_terms(
                tools.nets.get("discriminator", self.discriminator), [f.detach() for f in feats], batch["modality"]
            )
        tools.scaler.scale(loss_disc).backward()
        tools.scaler.step(opt)
        return {"loss_disc": loss_disc.detach(), "acc_disc": losses.binary_accuracy(logits, batch["modality"])}

    def frozen_in_main_step(self) -> list[nn.Module]:
        return [self.discriminator] if self.discriminator is not None else []

    def losses(self, outputs: Any, batch: Batch) -> tuple[torch.Tensor, Terms]:
        """Weighted generator objective and its terms; M is called bare (frozen: only the encoder learns)."""
        feats, restored, scale_logits = outputs
        w = self.weights
        terms: Terms = {"loss_res": losses.restoration(restored, batch["target"])}
        objective = w["restoration"] * terms["loss_res"]
        if scale_logits is not None:
            terms["loss_scale"], terms["acc_scale"] = losses.classification(scale_logits, batch["scale"])
            objective = objective + w["scale"] * terms["loss_scale"]
        total = objective
        if self.discriminator is not None:
            modality = batch["modality"]
            terms["loss_adv_enc"], logits_m = losses.binary_logit_terms(self.discriminator, feats, modality, flip=True)
            # the encoder's confusion: how often M calls a cube's modality wrong
            terms["confusion"] = ((logits_m.detach() > 0).long() != modality).float().mean()
            total = total + w["adversarial"] * terms["loss_adv_enc"]
        terms["objective"] = objective
        terms["loss_total"] = total
        return total, {k: v.detach() for k, v in terms.items()}

    def validation_terms(self, batch: Batch) -> Terms:
        """Every generator term, plus M's own BCE and accuracy, on the bare modules."""
        outputs = self.forward(self.network(), batch)
        terms = dict(self.losses(outputs, batch)[1])
        if self.discriminator is not None:
            loss_disc, logits = losses.binary_logit_terms(self.discriminator, outputs[0], batch["modality"])
            terms["loss_disc"] = loss_disc.detach()
            terms["acc_disc"] = losses.binary_accuracy(logits, batch["modality"])
        return terms

