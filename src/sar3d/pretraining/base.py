"""The pre-training method seam: what a method declares and what it computes; the run loop does the rest.

A method is one subclass of :class:`PretrainMethod` in ``pretraining/methods/<kind>.py``,
registered with :func:`sar3d.pretraining.registry.register`. It declares:

* **metadata** (class attributes): ``kind`` (the ``kind:`` of its config blocks),
  ``display`` and ``rank`` (name and row position in the tables), ``input``
  (cube shards or normalised volumes), ``export`` (the whole U-Net, or the
  encoder only so fine-tuning starts a fresh decoder), ``artefacts`` (cached
  per-volume files its own rule makes), ``shared_keys`` (the shared ``pretrain``
  settings it reads besides :data:`TRAINING_KEYS`) and ``block_schema`` (JSON
  schema properties of its config block, defaults included);
* **heads** (:meth:`build_heads`) on the shared, seeded U-Net, and its parameter
  groups and learning rates (:meth:`param_groups`, :meth:`optimizers`);
* **views** (:meth:`make_views`): the batch its step trains on, made from the
  loader's raw batch with a seeded generator (in the loader workers or on the
  training device, same numbers either way);
* **losses** (:meth:`forward`, :meth:`losses`): the terms logged, ``loss_total``
  that is minimised and ``objective``, the validation score that chooses the
  checkpoint; optionally an extra optimisation step before the main one
  (:meth:`side_step`, SAR's discriminator) and modules frozen during the main step.

One instance pre-trains one config block (e.g. ``sar_s2``) in one job; the loop
in :mod:`sar3d.pretraining.run` builds it, calls these hooks and owns optimisers,
schedules, checkpoints, exact resume, mixed precision, DDP and MLflow.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from sar3d.nets.unet import ENCODER_PREFIXES, UNet3D
from sar3d.seeding import derive_seed
from sar3d.training.devices import prepare_model

# what a method reads
CUBES = "cubes"  # the multi-scale cube shards (data/cubes.py, data/loader.py)
VOLUMES = "volumes"  # the normalised pre-training volumes (data/volumes.py)
# what a method hands to fine-tuning
ENCODER_DECODER = "encoder_decoder"
ENCODER = "encoder"  # fine-tuning keeps its seeded random decoder
# which tables a method's fine-tuned rows go to (sar3d.grid)
MAIN = "main"  # Tables 2 and 4 (finetune.inits)
SCALE_ABLATION = "scale_ablation"  # Table 3 (finetune.ablation_inits)

# shared ``pretrain`` settings the run loop reads for every method (the job's rule params)
TRAINING_KEYS = (
    "datasets", "width", "batch_size", "epochs", "steps_per_epoch", "val_steps", "optimizer", "plateau",
    "early_stopping_patience", "precision", "memory_format", "transform_device",
)
OPTIMIZERS = ("sgd", "adam")

Batch = dict[str, Any]
Terms = dict[str, torch.Tensor]


@dataclass(frozen=True)
class PretrainJob:
    """One pre-training job: which config block, its inputs and its outputs.

    Args:
        method: the block's name in ``pretrain.methods`` (e.g. ``sar_s2``).
        data: the cube shard folders, one per pre-training dataset (they also fix every case's split).
        out: the exported weights (a plain state dict).
        checkpoint: the full resumable training state.
        volumes: the normalised volume folders, for a method whose ``input`` is :data:`VOLUMES`.
        artefacts: each declared artefact's folders, one per pre-training dataset.
    """

    method: str
    data: tuple[Path, ...]
    out: Path
    checkpoint: Path
    volumes: tuple[Path, ...] = ()
    artefacts: Mapping[str, tuple[Path, ...]] = field(default_factory=dict)


@dataclass
class StepTools:
    """What the run loop lends a method's :meth:`PretrainMethod.side_step`.

    Args:
        optimizers: every optimiser of :meth:`PretrainMethod.optimizers`, by name.
        scaler: the loss scaler (a pass-through unless fp16 on CUDA).
        device: the training device.
        amp: the autocast dtype, or None for full precision.
        nets: the (possibly DDP-wrapped) modules a step calls, by name (:meth:`PretrainMethod.wrapped`).
    """

    optimizers: Mapping[str, torch.optim.Optimizer]
    scaler: torch.amp.GradScaler
    device: torch.device
    amp: torch.dtype | None = None
    nets: Mapping[str, nn.Module] = field(default_factory=dict)


def make_optimizer(settings: Mapping[str, Any], groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """SGD with momentum or Adam over named parameter groups; ``settings['lr']`` is the default lr.

    Args:
        settings: ``{name: sgd | adam, lr, momentum}`` (``pretrain.optimizer`` or a block's ``optimizer``).
        groups: ``[{"params", "lr", "name"}, ...]``.
    """
    if settings["name"] == "adam":
        return torch.optim.Adam(groups, lr=settings["lr"])
    return torch.optim.SGD(groups, lr=settings["lr"], momentum=settings["momentum"])


class PretrainMethod:
    """Base of every pre-training method: the shared U-Net plus whatever a subclass adds.

    Args:
        name: the config block's name (e.g. ``sar_s2``); seeds and MLflow runs are keyed by it.
        config: the validated study config.
        device: where training runs.
    """

    kind: ClassVar[str]
    display: ClassVar[str]
    rank: ClassVar[float]  # row position in the tables; Scratch is 0 (see registry.describe)
    input: ClassVar[str] = CUBES
    export: ClassVar[str] = ENCODER_DECODER
    artefacts: ClassVar[tuple[str, ...]] = ()
    shared_keys: ClassVar[tuple[str, ...]] = ()
    block_schema: ClassVar[dict[str, Any]] = {}
    # the main optimiser's name: the plateau schedule and the checkpointed best weights follow it
    main: ClassVar[str] = "main"

    def __init__(self, name: str, config: Mapping[str, Any], device: torch.device) -> None:
        self.name = name
        self.config = config
        self.block: dict[str, Any] = dict(config["pretrain"]["methods"][name])
        self.settings: Mapping[str, Any] = config["pretrain"]
        self.device = device
        # each declared artefact's folders (one per pre-training dataset), set by the run loop
        self.artefact_dirs: Mapping[str, tuple[Path, ...]] = {}
        self.unet = self._seeded("unet", lambda: UNet3D(
            in_channels=1, out_channels=self.out_channels(), width=self.settings["width"],
            final_activation="sigmoid",
        ))
        self.heads: dict[str, nn.Module] = {}
        for head, build in self.build_heads().items():
            self.heads[head] = self._seeded(head, build)

    # ------------------------------------------------------------------ declarations per config block

    @classmethod
    def display_name(cls, block: Mapping[str, Any]) -> str:
        """The name tables and figures show for a block of this kind."""
        return cls.display

    @classmethod
    def table_rank(cls, block: Mapping[str, Any]) -> float:
        """Row position in the tables (the paper's order); blocks of one kind may differ."""
        return cls.rank

    @classmethod
    def role(cls, block: Mapping[str, Any]) -> str:
        """Which tables a block's fine-tuned rows belong to: :data:`MAIN` or :data:`SCALE_ABLATION`."""
        return MAIN

    @classmethod
    def check(cls, name: str, block: Mapping[str, Any], config: Mapping[str, Any]) -> list[tuple[str, str]]:
        """Cross-checks of a block against the study (after its schema check); ``(key, message)`` per problem.

        The key names the offending setting, e.g. ``pretrain.methods.sar_s2.scales``.
        """
        return []

    @classmethod
    def make_artefact(cls, config: Mapping[str, Any], name: str, artefact: str, volumes: Path, out: Path) -> None:
        """Write artefact ``artefact`` of every volume in ``volumes`` (one dataset) to the folder ``out``.

        Run once per dataset by the ``pretrain_artefact`` rule, before any job of
        block ``name`` starts; required of a kind that declares :attr:`artefacts`.
        """
        raise NotImplementedError(f"{cls.__name__} declares artefacts {cls.artefacts} but no make_artefact()")

    # ------------------------------------------------------------------ models

    def out_channels(self) -> int:
        """Output channels of the U-Net's restoration layer (1: one intensity per voxel)."""
        return 1

    def build_heads(self) -> dict[str, Callable[[], nn.Module]]:
        """Constructors of the method's heads by name; each runs under its own seed ``(seed, pretrain, init, name)``."""
        return {}

    def _seeded(self, name: str, build: Callable[[], nn.Module]) -> nn.Module:
        """Build under a seed of the study seed and the module's name, not the method: ablations share a start."""
        torch.manual_seed(derive_seed(self.config["seed"], "pretrain", "init", name))
        return prepare_model(build(), self.device, self.settings["memory_format"])

    @property
    def modules(self) -> dict[str, nn.Module]:
        """Everything trained and checkpointed: the U-Net first, then the heads."""
        return {"unet": self.unet, **self.heads}

    def network(self) -> nn.Module:
        """The module the main step's forward runs through (DDP wraps it): by default the U-Net."""
        return self.unet

    def wrapped_apart(self) -> dict[str, nn.Module]:
        """Modules that run outside :meth:`network` and need their own DDP wrapper (SAR's discriminator)."""
        return {}

    def optimizer_settings(self) -> dict[str, Any]:
        """The shared ``pretrain.optimizer`` with the block's own ``optimizer`` keys on top."""
        return {**self.settings["optimizer"], **self.block.get("optimizer", {})}

    def param_groups(self) -> list[dict[str, Any]]:
        """The main optimiser's named parameter groups; by default the U-Net at the optimiser's lr."""
        return [{"params": list(self.unet.parameters()), "lr": self.optimizer_settings()["lr"], "name": "unet"}]

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Every optimiser by name; ``main`` (:attr:`main`) follows the plateau schedule."""
        return {self.main: make_optimizer(self.optimizer_settings(), self.param_groups())}

    # ------------------------------------------------------------------ data

    def on_epoch_start(self, epoch: int, train_store: Any) -> None:
        """Called by the run loop before each training epoch (also the first after a resume).

        For work over the whole training set between steps (e.g. clustering region
        embeddings). Keep what it computes in buffers of a module in :attr:`modules`
        (checkpointed and restored with them) and make it a function of the weights,
        the store and seeded generators only, so a resumed job repeats it exactly.
        By default nothing.
        """

    def cube_scales(self) -> list[int] | None:
        """Scale labels of the cubes the method trains on (positions in ``cubes.scales``); None = all."""
        return None

    def make_views(self, batch: Batch, generator: torch.Generator) -> Batch:
        """The training inputs of one raw batch, every random draw from ``generator`` (on the batch's device).

        The raw batch of a cube method is ``{"cube" (B,1,X,Y,Z) in [0, 1], "scale", "modality"}``;
        of a volume method ``{"volumes": list of (1,X,Y,Z), "modality", "case"}``. By default: unchanged.
        """
        return batch

    # ------------------------------------------------------------------ the step

    def forward(self, net: nn.Module, batch: Batch) -> Any:
        """Run ``net`` (:meth:`network`, maybe DDP-wrapped) on a batch; what :meth:`losses` reads."""
        raise NotImplementedError(f"{type(self).__name__} must define forward()")

    def losses(self, outputs: Any, batch: Batch) -> tuple[torch.Tensor, Terms]:
        """The loss to minimise and the logged terms (detached), which must include ``objective``."""
        raise NotImplementedError(f"{type(self).__name__} must define losses()")

    def side_step(self, outputs: Any, batch: Batch, tools: StepTools) -> Terms:
        """An optimisation step before the main one (SAR's discriminator); returns its logged terms."""
        return {}

    def frozen_in_main_step(self) -> list[nn.Module]:
        """Modules whose weights the main step must not move (their gradients are not even computed)."""
        return []

    def validation_terms(self, batch: Batch) -> Terms:
        """Every term on a validation batch, nothing updated; ``objective`` chooses the checkpoint."""
        return self.losses(self.forward(self.network(), batch), batch)[1]

    # ------------------------------------------------------------------ export

    def exported(self, unet_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What fine-tuning receives from the best U-Net weights: all of them, or the encoder's only."""
        if self.export == ENCODER:
            return {k: v for k, v in unet_state.items() if k.startswith(ENCODER_PREFIXES)}
        return dict(unet_state)


@contextlib.contextmanager
def frozen(modules: list[nn.Module]) -> Iterator[None]:
    """``requires_grad_(False)`` on ``modules`` for the block, restored even when it raises."""
    for module in modules:
        module.requires_grad_(False)
    try:
        yield
    finally:
        for module in modules:
            module.requires_grad_(True)
