"""SepaReg in 3D (Wang et al., AAAI 2022): region-level SimSiam, then intra-/inter-organ distillation.

Why regions: pixel-level contrast treats neighbouring voxels of one map as
negatives although they share semantics; SepaReg contrasts whole structures
(supervoxels of :mod:`.separeg_regions`) instead. Then k-means on the shared
network's region embeddings gives pseudo-organs; one expert per cluster learns
its organ (intra-organ), and the student distils from its region's expert and
from the shared network (inter-organ). The released code is 2D and partial
(shared/specs/ssl-methods.md section 3); every 3D adaptation is a line of
docs/deviations.md ("VectorPOSE and SepaReg").

This module is the registered method and its phases; the heads, losses,
k-means and training steps are in :mod:`.separeg_learning`, the view
augmentations in :mod:`.separeg_views`, the supervoxels in :mod:`.separeg_regions`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sar3d.io import InputDataError, atomic_output, load_volume, read_json, voxel_spacing
from sar3d.nets.unet import UNet3D
from sar3d.paths import MANIFEST
from sar3d.pretraining.base import ENCODER, VOLUMES, Batch, PretrainMethod, StepTools, Terms, make_optimizer
from sar3d.pretraining.methods.separeg_learning import (
    PredictionHead,
    ProjectionHead,
    SiameseBranch,
    kmeans_clusters,
    simsiam_loss,
    simsiam_step,
    teacher_loss,
)
from sar3d.pretraining.methods.separeg_regions import (
    RegionConfig,
    Regions,
    compute_regions,
    load_regions,
    region_crop,
    save_regions,
)
from sar3d.pretraining.methods.separeg_views import (
    RegionViews,
)
from sar3d.pretraining.registry import register
from sar3d.seeding import derive_seed

__all__ = ["SepaReg", "StudentNet", "regions_name"]


# ---------------------------------------------------------------------------------------------- the method

REGION_KEYS = {
    f.name: {"type": "integer" if isinstance(f.default, int) else "number",
             "description": f"RegionConfig.{f.name} (see separeg_regions.RegionConfig)."}
    for f in fields(RegionConfig) if f.name != "out_size"  # the network input is cubes.size
}


class _PhaseState(nn.Module):
    """SepaReg's phase bookkeeping as buffers, so the checkpoint (and an exact resume) carries it.

    ``bank`` holds the last projections of the shared network (phase 1); at the phase change k-means on it
    gives ``centroids`` and ``clustered`` turns on.
    """

    def __init__(self, bank_size: int, dim: int, clusters: int) -> None:
        super().__init__()
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.register_buffer("bank", torch.zeros((bank_size, dim)))
        self.register_buffer("filled", torch.zeros((), dtype=torch.int64))
        self.register_buffer("centroids", torch.zeros((clusters, dim)))
        self.register_buffer("clustered", torch.zeros((), dtype=torch.bool))

    def remember(self, z: Tensor) -> None:
        """Append normalised projections to the ring bank."""
        z = F.normalize(z.detach().float(), dim=1)
        n = self.bank.shape[0]
        index = (self.filled + torch.arange(z.shape[0], device=z.device)) % n
        self.bank[index] = z[-n:] if z.shape[0] > n else z
        self.filled += z.shape[0]


class StudentNet(nn.Module):
    """The exported U-Net's encoder with the student's projector and predictor: ``(z, p)`` of a view batch."""

    def __init__(self, unet: nn.Module, projector: nn.Module, predictor: nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self.projector = projector
        self.predictor = predictor

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = self.projector(self.unet.encode(x)[-1])
        return z, self.predictor(z)


@register
class SepaReg(PretrainMethod):
    """SepaReg on the shared U-Net: SimSiam on supervoxel regions, then k experts and distillation.

    Phases by training step (not yet by the run loop's ``on_epoch_start``; docs/deviations.md): the first
    ``inter_fraction`` of the steps train the student itself with SimSiam (it is the shared network then); at
    the change, k-means on the bank of its recent region projections gives the pseudo-organs, the shared network
    and the k experts are copied from the student; afterwards each step trains the experts of the batch's
    clusters with SimSiam (side step) and distils the student from its regions' experts and the frozen shared
    network (main step).
    """

    kind = "separeg"
    display = "SepaReg"
    rank = 65.0
    input = VOLUMES
    export = ENCODER
    artefacts = ("regions",)
    block_schema: ClassVar[dict[str, Any]] = {
        "regions": {"type": "object", "additionalProperties": False, "default": {}, "properties": REGION_KEYS,
                    "description": "Supervoxel settings (sar3d.pretraining.methods.separeg_regions.RegionConfig)."},
        "regions_per_volume": {"type": "integer", "minimum": 1, "default": 1,
                               "description": "Regions drawn from each volume of a batch."},
        "clusters": {"type": "integer", "minimum": 1, "default": 4, "description": "Pseudo-organs (experts)."},
        "inter_fraction": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 0.5,
                           "description": "Fraction of the training steps spent on region SimSiam alone."},
        "bank_size": {"type": "integer", "minimum": 1, "default": 256,
                      "description": "Recent region projections k-means runs on at the phase change."},
        "hidden": {"type": "integer", "minimum": 1, "default": 512,
                   "description": "Projector/predictor hidden width (released 4096)."},
        "projection": {"type": "integer", "minimum": 1, "default": 128,
                       "description": "Projection size (released 256)."},
        "expert_lr": {"type": "number", "exclusiveMinimum": 0, "default": 0.01,
                      "description": "Learning rate of the experts (SGD with the shared momentum)."},
    }

    def __init__(self, name: str, config: Mapping[str, Any], device: torch.device) -> None:
        super().__init__(name, config, device)
        self.region_cfg = self.region_config(config, name)
        self.views = RegionViews()
        total = int(self.settings["epochs"]) * int(self.settings["steps_per_epoch"])
        self.inter_steps = max(1, round(self.block["inter_fraction"] * total))
        self._regions: dict[str, Regions] = {}

    @classmethod
    def region_config(cls, config: Mapping[str, Any], name: str) -> RegionConfig:
        block = config["pretrain"]["methods"][name]
        return RegionConfig.from_config({**block.get("regions", {}), "out_size": config["cubes"]["size"]},
                                        key=f"pretrain.methods.{name}.regions")

    # ------------------------------------------------------------------ artefact

    @classmethod
    def make_artefact(cls, config: Mapping[str, Any], name: str, artefact: str, volumes: Path, out: Path) -> None:
        """One regions ``.npz`` per case of the dataset (``<case>.npz``), from the case's first listed channel.

        Why per case: the channels of a case (BraTS' four sequences) are co-registered, so one anatomical
        partition serves all of them, and the volume batch names its case.
        """
        if artefact != "regions":
            raise ValueError(f"{cls.kind} has no artefact '{artefact}' (it declares {cls.artefacts})")
        cfg = cls.region_config(config, name)
        manifest = read_json(Path(volumes) / MANIFEST)
        with atomic_output(out, directory=True) as tmp:
            for entry in manifest["cases"]:
                target = tmp / regions_name(str(entry["case"]))
                if target.exists():  # another channel of a case already separated
                    continue
                path = Path(volumes) / entry["image"]
                array, affine = load_volume(path)
                save_regions(target, compute_regions(array, voxel_spacing(affine), cfg, source=path))

    def regions_of(self, case: str) -> Regions:
        """The cached regions of a case, read once."""
        name = regions_name(case)
        if name not in self._regions:
            for folder in self.artefact_dirs.get("regions", ()):
                if (Path(folder) / name).exists():
                    self._regions[name] = load_regions(Path(folder) / name)
                    break
            else:
                raise InputDataError(name, f"no regions artefact in {list(self.artefact_dirs.get('regions', ()))}")
        return self._regions[name]

    # ------------------------------------------------------------------ models

    def build_heads(self) -> dict[str, Callable[[], nn.Module]]:
        deepest = self.unet.encoder_channels[-1]
        hidden, dim, k = self.block["hidden"], self.block["projection"], self.block["clusters"]
        width = self.settings["width"]

        def branch() -> SiameseBranch:
            return SiameseBranch(UNet3D(1, 1, width=width), hidden, dim)

        return {
            "projector": lambda: ProjectionHead(deepest, hidden, dim),
            "predictor": lambda: PredictionHead(dim, hidden),
            "shared": branch,
            "experts": lambda: nn.ModuleList(branch() for _ in range(k)),
            "phase": lambda: _PhaseState(self.block["bank_size"], dim, k),
        }

    def network(self) -> nn.Module:
        return StudentNet(self.unet, self.heads["projector"], self.heads["predictor"])

    def param_groups(self) -> list[dict[str, Any]]:
        lr = self.optimizer_settings()["lr"]
        student = [*self.unet.parameters(), *self.heads["projector"].parameters(),
                   *self.heads["predictor"].parameters()]
        return [{"params": student, "lr": lr, "name": "student"}]

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        optimizers = super().optimizers()
        settings = {**self.optimizer_settings(), "lr": self.block["expert_lr"]}
        optimizers["experts"] = make_optimizer(
            settings, [{"params": list(self.heads["experts"].parameters()), "lr": settings["lr"], "name": "experts"}])
        return optimizers

    def frozen_in_main_step(self) -> list[nn.Module]:
        return [self.heads["shared"], self.heads["experts"]]

    # ------------------------------------------------------------------ data

    def make_views(self, batch: Batch, generator: torch.Generator) -> Batch:
        """``regions_per_volume`` random regions of each volume, two augmented views of each."""
        per = self.block["regions_per_volume"]
        crops = []
        for volume, case in zip(batch["volumes"], batch["case"], strict=True):
            regions = self.regions_of(str(case))
            array = volume[0].detach().cpu().numpy()
            for i in torch.randint(0, len(regions), (per,), generator=generator, device=generator.device).tolist():
                crops.append(region_crop(array, regions, i, self.region_cfg.out_size))
        stacked = torch.from_numpy(np.stack(crops))[:, None].to(generator.device)
        view1, view2 = self.views(stacked, generator)
        rest = {k: v for k, v in batch.items() if k not in ("volumes", "case")}
        if "modality" in rest:
            rest["modality"] = rest["modality"].repeat_interleave(per)
        return {"view1": view1, "view2": view2, **rest}

    # ------------------------------------------------------------------ the step

    def forward(self, net: nn.Module, batch: Batch) -> Any:
        z1, p1 = net(batch["view1"])
        z2, p2 = net(batch["view2"])
        return z1, p1, z2, p2

    @torch.no_grad()
    def clusters_of(self, view: Tensor) -> Tensor:
        """Pseudo-organ of each region: the centroid nearest to the shared network's projection."""
        z = F.normalize(self.heads["shared"](view)[0].float(), dim=1)
        return torch.cdist(z, self.heads["phase"].centroids).argmin(dim=1)

    def side_step(self, outputs: Any, batch: Batch, tools: StepTools) -> Terms:
        """Phase 1: bank projections, and at the change run k-means and copy the teachers; phase 2: train experts."""
        phase = self.heads["phase"]
        if not bool(phase.clustered) and int(phase.step) >= self.inter_steps:
            self._start_distillation()  # the first step after the SimSiam phase
        phase.step += 1
        if not bool(phase.clustered):
            phase.remember(outputs[0])
            return {}
        clusters = self.clusters_of(batch["view1"])
        terms = []
        for k in torch.unique(clusters).tolist():
            members = clusters == k
            if int(members.sum()) > 1:  # BN needs two samples
                terms.append(simsiam_step(self.heads["experts"][k], tools.optimizers["experts"],
                                          batch["view1"][members], batch["view2"][members]))
        return {"loss_experts": torch.stack(terms).mean()} if terms else {}

    @torch.no_grad()
    def _start_distillation(self) -> None:
        phase = self.heads["phase"]
        bank = phase.bank[: min(int(phase.filled), phase.bank.shape[0])].cpu().numpy()
        seed = derive_seed(self.config["seed"], "pretrain", self.name, "kmeans")
        labels = torch.from_numpy(kmeans_clusters(bank, phase.centroids.shape[0], seed))
        bank_t = torch.from_numpy(bank)
        for k in range(phase.centroids.shape[0]):
            phase.centroids[k] = F.normalize(bank_t[labels == k].mean(0), dim=0).to(phase.centroids.device)
        student = {"unet": self.unet.state_dict(), "projector": self.heads["projector"].state_dict(),
                   "predictor": self.heads["predictor"].state_dict()}
        for branch in (self.heads["shared"], *self.heads["experts"]):
            branch.unet.load_state_dict(student["unet"])
            branch.projector.load_state_dict(student["projector"])
            branch.predictor.load_state_dict(student["predictor"])
        phase.clustered.fill_(True)

    def losses(self, outputs: Any, batch: Batch) -> tuple[torch.Tensor, Terms]:
        z1, p1, z2, p2 = outputs
        terms: Terms = {}
        if not bool(self.heads["phase"].clustered):
            terms["loss_simsiam"] = simsiam_loss(p1, p2, z1, z2)
            terms["objective"] = terms["loss_simsiam"]
        else:
            clusters = self.clusters_of(batch["view1"])
            shared, experts = self.heads["shared"], self.heads["experts"]
            terms["loss_distil_shared"] = teacher_loss(shared, z1, z2, batch["view1"], batch["view2"])
            parts = []
            for k in torch.unique(clusters).tolist():
                members = clusters == k
                if int(members.sum()) > 1:  # batch-statistics BN needs two samples
                    parts.append(teacher_loss(experts[k], z1[members], z2[members], batch["view1"][members],
                                              batch["view2"][members]))
            terms["loss_distil_experts"] = torch.stack(parts).mean() if parts else terms["loss_distil_shared"]
            terms["objective"] = 0.5 * (terms["loss_distil_shared"] + terms["loss_distil_experts"])
        terms["loss_total"] = terms["objective"]
        return terms["loss_total"], {k: v.detach() for k, v in terms.items()}


def regions_name(case: str) -> str:
    """The artefact file of a case; path separators cannot occur in it."""
    if "/" in case or "\\" in case or case in ("", ".", ".."):
        raise ValueError(f"case id {case!r} cannot name a regions file")
    return f"{case}.npz"
