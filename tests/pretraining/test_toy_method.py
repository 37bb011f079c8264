"""A new pre-training method needs its own module, its registration and its test - nothing else.

Two toy methods, written and registered here and never shipped, go through the
whole study path: the config accepts their blocks, the one run loop pre-trains
them, fine-tuning receives their export and the tables list them.

* ``toy_halves``: several views per sample (the two halves of a cube, maybe
  swapped) through a head on encoder features of the patches, its own optimiser
  (Adam) from its block, and an encoder-only export, so fine-tuning starts a
  demonstrably fresh decoder.
* ``toy_volumes``: reads whole normalised volumes instead of cube shards (random
  crops) and a cached per-volume artefact made by its own ``make_artefact``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cubeshards import SIZE, cube_folder, make_config
from sar3d.finetuning.run import init_model
from sar3d.grid import table2_inits
from sar3d.io import load_volume, read_json, save_volume, write_json
from sar3d.nets.unet import ENCODER_PREFIXES
from sar3d.paths import MANIFEST
from sar3d.pretraining import losses, registry
from sar3d.pretraining.base import ENCODER, VOLUMES, Batch, PretrainJob, PretrainMethod, Terms
from sar3d.pretraining.methods.genesis import Genesis
from sar3d.pretraining.run import run_pretrain
from sar3d.reporting.report import run_report


class HalvesNet(nn.Module):
    """Encoder features of both halves -> is the pair swapped? One module, so DDP would sync it all."""

    def __init__(self, unet: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.unet, self.head = unet, head

    def forward(self, halves: torch.Tensor) -> torch.Tensor:  # (B, 2, 1, X/2, Y, Z)
        b = halves.shape[0]
        deepest = self.unet.encode(halves.flatten(0, 1))[-1]
        pooled = F.adaptive_avg_pool3d(deepest, 1).flatten(1).reshape(b, -1)
        return self.head(pooled)


@registry.register
class ToyHalves(PretrainMethod):
    """Is a cube's pair of halves in order? Multi-view, Adam, encoder-only."""

    kind = "toy_halves"
    display = "Toy halves"
    rank = 50.0
    export = ENCODER
    block_schema: ClassVar[dict[str, Any]] = {
        "hidden": {"type": "integer", "minimum": 1, "default": 8, "description": "Width of the head."},
    }

    def build_heads(self) -> dict[str, Callable[[], nn.Module]]:
        deepest = self.unet.encoder_channels[-1]
        return {"order_head": lambda: nn.Sequential(
            nn.Linear(2 * deepest, self.block["hidden"]), nn.ReLU(), nn.Linear(self.block["hidden"], 2))}

    def network(self) -> nn.Module:
        return HalvesNet(self.unet, self.heads["order_head"])

    def param_groups(self) -> list[dict[str, Any]]:
        lr = self.optimizer_settings()["lr"]
        return [*super().param_groups(),
                {"params": list(self.heads["order_head"].parameters()), "lr": lr, "name": "order_head"}]

    def make_views(self, batch: Batch, generator: torch.Generator) -> Batch:
        cube = batch["cube"]
        half = cube.shape[2] // 2
        halves = torch.stack([cube[:, :, :half], cube[:, :, half:]], dim=1)
        swapped = torch.rand(cube.shape[0], generator=generator, device=cube.device) < 0.5
        halves = torch.where(swapped[:, None, None, None, None, None], halves.flip(1), halves)
        return {"halves": halves, "swapped": swapped.long()}

    def forward(self, net: nn.Module, batch: Batch) -> Any:
        return net(batch["halves"])

    def losses(self, outputs: Any, batch: Batch) -> tuple[torch.Tensor, Terms]:
        loss, accuracy = losses.classification(outputs, batch["swapped"])
        return loss, {"loss_order": loss.detach(), "acc_order": accuracy, "objective": loss.detach(),
                      "loss_total": loss.detach()}


@registry.register
class ToyVolumes(Genesis):
    """Genesis restoration of random crops of whole volumes, each blended with its volume's cached mean."""

    kind = "toy_volumes"
    display = "Toy volumes"
    rank = 55.0
    input = VOLUMES
    artefacts = ("means",)

    @classmethod
    def make_artefact(cls, config: Mapping[str, Any], name: str, artefact: str, volumes: Path, out: Path) -> None:
        manifest = read_json(volumes / MANIFEST)
        means = {e["case"]: float(load_volume(volumes / e["image"])[0].mean()) for e in manifest["cases"]}
        write_json(out / "means.json", means)

    def make_views(self, batch: Batch, generator: torch.Generator) -> Batch:
        means = {k: v for d in self.artefact_dirs["means"] for k, v in read_json(d / "means.json").items()}
        crops = []
        for volume, case in zip(batch["volumes"], batch["case"], strict=True):
            corner = [int(torch.randint(0, s - c + 1, (1,), generator=generator, device=volume.device))
                      for s, c in zip(volume.shape[1:], SIZE, strict=True)]
            box = tuple(slice(c, c + s) for c, s in zip(corner, SIZE, strict=True))
            crops.append((0.5 * volume[(slice(None), *box)] + 0.5 * means[case]).clamp(0, 1))
        return super().make_views({"cube": torch.stack(crops), "modality": batch["modality"]}, generator)


def volume_folder(root: Path, cubes: Path, seed: int) -> Path:
    """Normalised volumes of every case of a cube shard (a pre-training manifest as `sar3d normalise` writes)."""
    shard = read_json(cubes / MANIFEST)
    cases = sorted({line.split(",")[1] for line in (cubes / "meta.csv").read_text().splitlines()[1:]})
    rng = np.random.default_rng(seed)
    entries = []
    for case in cases:
        image = f"images/{case}_c0.nii.gz"
        (root / "images").mkdir(parents=True, exist_ok=True)
        save_volume(root / image, rng.random((24, 20, 12)), np.eye(4))
        entries.append({"case": case, "channel": 0, "image": image})
    write_json(root / MANIFEST, {"purpose": "pretrain", "dataset": shard["dataset"], "modality": shard["modality"],
                                 "cases": entries})
    return root


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("toy")
    cubes = [cube_folder(root / "ct", "ct", 0, 32, 1), cube_folder(root / "mri", "mri", 1, 32, 2)]
    volumes = [volume_folder(root / "volumes" / d.name, d, k) for k, d in enumerate(cubes)]
    blocks = {
        "toy": {"kind": "toy_halves", "optimizer": {"name": "adam", "lr": 0.001}},
        "toy_vol": {"kind": "toy_volumes"},
    }
    config = make_config(root, methods=blocks)
    config["finetune"]["inits"] = ["scratch", "toy", "sar", "toy_vol"]
    return {"root": root, "cubes": cubes, "volumes": volumes, "config": config}


def test_toy_blocks_are_configured_with_defaults_and_listed_in_paper_order(study):
    config = study["config"]
    assert config["pretrain"]["methods"]["toy"]["hidden"] == 8  # the kind's default, filled
    assert registry.job_settings(config, "toy")["block"]["optimizer"] == {"name": "adam", "lr": 0.001}
    assert "transforms" not in registry.job_settings(config, "toy")["shared"]  # it reads no corruption
    assert table2_inits(config) == ["scratch", "toy", "toy_vol", "sar"]  # by rank, not config order
    assert registry.display_name(config, "toy") == "Toy halves"


def test_toy_pretrains_exports_its_encoder_and_finetunes_with_a_fresh_decoder(study, tmp_path):
    config = study["config"]
    out, ckpt = tmp_path / "toy.pt", tmp_path / "toy_ckpt.pt"
    run_pretrain(config, PretrainJob("toy", tuple(study["cubes"]), out, ckpt))
    history = torch.load(ckpt, weights_only=True)["history"]
    assert len(history) == config["pretrain"]["epochs"]
    assert {"train/loss_order", "val/objective", "lr/unet", "lr/order_head"} <= set(history[0])
    state = torch.load(out, weights_only=True)
    assert state and all(k.startswith(ENCODER_PREFIXES) for k in state)  # encoder only

    task = "brain_tumour"
    tuned, _ = init_model(config, task, "toy", 0, out)
    scratch, _ = init_model(config, task, "scratch", 0, None)
    tuned_state, scratch_state = tuned.state_dict(), scratch.state_dict()
    for key, value in tuned_state.items():
        if key.startswith(ENCODER_PREFIXES):
            assert torch.equal(value, state[key]), key
        else:  # the decoder is the seeded fresh init of fine-tuning from scratch
            assert torch.equal(value, scratch_state[key]), key
    assert any(not k.startswith(ENCODER_PREFIXES) for k in tuned_state)


def test_toy_volume_method_reads_volumes_and_its_artefact(study, tmp_path):
    config = study["config"]
    cls = registry.method_class(config, "toy_vol")
    artefacts = []
    for folder in study["volumes"]:
        target = tmp_path / "means" / folder.name
        target.mkdir(parents=True)
        cls.make_artefact(config, "toy_vol", "means", folder, target)
        artefacts.append(target)
    out, ckpt = tmp_path / "vol.pt", tmp_path / "vol_ckpt.pt"
    job = PretrainJob("toy_vol", tuple(study["cubes"]), out, ckpt, volumes=tuple(study["volumes"]),
                      artefacts={"means": tuple(artefacts)})
    run_pretrain(config, job)
    history = torch.load(ckpt, weights_only=True)["history"]
    assert all(np.isfinite(h["train/loss_res"]) and np.isfinite(h["val/loss_res"]) for h in history)
    assert "down_tr64.ops.0.conv1.weight" in torch.load(out, weights_only=True)
    with pytest.raises(ValueError, match="needs its artefacts"):
        run_pretrain(config, PretrainJob("toy_vol", tuple(study["cubes"]), out, ckpt, volumes=job.volumes))


def test_toy_rows_appear_in_the_tables(study, tmp_path):
    config = study["config"]
    out_csv, out_md = tmp_path / "t2.csv", tmp_path / "t2.md"
    run_report(config, None, out_csv, out_md, table="table2")  # no evaluations yet: every cell a dash
    rows = [line.split("|")[1].strip() for line in out_md.read_text().splitlines() if line.startswith("| ")]
    # the table's rows in the paper's order (then the comparison with SAR lists them again)
    assert list(dict.fromkeys(r for r in rows if r.startswith("Toy"))) == ["Toy halves", "Toy volumes"]
