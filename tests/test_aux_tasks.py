"""SAR's auxiliary tasks can learn: scale and modality are readable from encoder features of phantom cubes.

The heads are trained alone on the frozen features of a randomly initialised
encoder (what they see at the first step of pre-training) and scored on cubes
of other volumes. Then the pre-training loop: selection on the objective without
the adversarial term, a discriminator lr that never follows the generator's
plateau, and validation with batch statistics.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cubeshards import cube_folder, make_config
from sar3d.data.cubes import cut_cubes
from sar3d.data.normalise import minmax_to_unit
from sar3d.data.phantom import generate_case
from sar3d.nets.heads import ModalityDiscriminator, ScaleHead
from sar3d.nets.unet import UNet3D, batch_statistics
from sar3d.pretraining.base import PretrainJob
from sar3d.pretraining.run import Trainer, run_pretrain

SIZE = (32, 32, 16)
SCALES = (0.5, 0.25, 0.125)
COUNTS = (6, 6, 12)  # 1:1:2, as the study cuts them
CLIP = {"CT": (-1000.0, 1000.0), "MRI": (0.0, 4000.0)}


def _phantom_cubes(kind: str, modality: str, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Cubes of one phantom volume (scaled to [0, 1] as for pre-training) with their scale labels."""
    image, _, affine = generate_case(kind, 7, index)
    volume = np.asarray(image, dtype=np.float32)
    if volume.ndim == 4:
        volume = volume[..., 0]  # FLAIR
    volume = minmax_to_unit(volume, *CLIP[modality], (0.0, 99.5))
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    cubes, crops = cut_cubes(volume, spacing, COUNTS, SCALES, SIZE, 0.05, np.random.default_rng(index))
    return cubes, np.array([crop.scale for crop in crops])


@pytest.fixture(scope="module")
def features() -> dict[str, dict[str, torch.Tensor]]:
    """Frozen random-encoder features of CT and MRI phantom cubes: volumes 0-2 train, 3-4 test."""
    splits: dict[str, dict[str, list]] = {"train": {"x": [], "scale": [], "modality": []},
                                          "test": {"x": [], "scale": [], "modality": []}}
    for code, (kind, modality) in enumerate([("chest_ct", "CT"), ("brain_mri", "MRI")]):
        for index in range(5):
            cubes, scale = _phantom_cubes(kind, modality, index)
            split = splits["train" if index < 3 else "test"]
            split["x"].append(cubes)
            split["scale"].append(scale)
            split["modality"].append(np.full(len(scale), code))
    torch.manual_seed(0)
    encoder = UNet3D(width=0.125)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, split in splits.items():
        x = torch.from_numpy(np.concatenate(split["x"])).unsqueeze(1)
        with torch.no_grad(), batch_statistics(encoder):
            feats = [torch.cat(level) for level in zip(*(encoder.encode(b) for b in x.split(16)), strict=True)]
        out[name] = {"feats": feats, "scale": torch.from_numpy(np.concatenate(split["scale"])),
                     "modality": torch.from_numpy(np.concatenate(split["modality"]))}
    return out


def _fit(head: torch.nn.Module, inputs, labels: torch.Tensor, loss_fn, steps: int = 300) -> None:
    torch.manual_seed(1)
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(head(inputs), labels).backward()
        opt.step()


def test_scale_head_beats_the_prior_on_frozen_encoder_features(features):
    train, test = features["train"], features["test"]
    head = ScaleHead(train["feats"][-1].shape[1])
    _fit(head, train["feats"][-1], train["scale"], F.cross_entropy)
    with torch.no_grad():
        accuracy = float((head(test["feats"][-1]).argmax(1) == test["scale"]).float().mean())
    prior = float(torch.bincount(test["scale"]).max()) / len(test["scale"])  # majority class share: 0.5
    assert accuracy > prior + 0.1, (accuracy, prior)


def test_discriminator_separates_ct_from_mri_on_frozen_encoder_features(features):
    train, test = features["train"], features["test"]
    disc = ModalityDiscriminator([f.shape[1] for f in train["feats"]])
    _fit(disc, train["feats"], train["modality"].float(), F.binary_cross_entropy_with_logits, steps=60)
    with torch.no_grad():
        accuracy = float(((disc(test["feats"]) > 0).long() == test["modality"]).float().mean())
    assert accuracy > 0.9, accuracy


def test_batch_statistics_normalises_per_batch_and_changes_nothing():
    torch.manual_seed(0)
    net = UNet3D(width=0.125)
    net.train()
    x = torch.rand(4, 1, 16, 16, 8)
    with torch.no_grad():
        for _ in range(3):
            net(x * 3 + 1)  # running statistics far from this batch's
        expected = net(x)
    net.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        eval_out = net(x)
        with batch_statistics(net):
            batch_out = net(x)
    torch.testing.assert_close(batch_out, expected)
    assert not torch.allclose(eval_out, expected)
    assert not net.training
    for key, value in net.state_dict().items():
        torch.testing.assert_close(value, before[key], msg=key)


def test_selection_follows_the_objective_not_the_adversarial_term(tmp_path: Path, monkeypatch):
    """Validation: restoration falls then plateaus while the adversarial term keeps rising.

    The best checkpoint is the restoration-best epoch, the U-Net lr halves only
    after the objective's plateau, and the discriminator's lr never moves.
    """
    dirs = [cube_folder(tmp_path / "ct", "ct", 0, 16, 1), cube_folder(tmp_path / "mri", "mri", 1, 16, 2)]
    objective = [1.0, 0.8, 0.6, 0.61, 0.62, 0.63, 0.64]
    adversarial = [0.5, 0.9, 1.3, 1.7, 2.1, 2.5, 2.9]  # objective + adversarial falls only up to epoch 1
    calls = {"n": 0}
    real_eval_step = Trainer.eval_step

    def scripted(trainer, batch):
        metrics = real_eval_step(trainer, batch)
        epoch = calls["n"]
        calls["n"] += 1
        metrics["objective"] = torch.tensor(objective[epoch])
        metrics["loss_adv_enc"] = torch.tensor(adversarial[epoch])
        metrics["loss_total"] = torch.tensor(objective[epoch] + adversarial[epoch])
        return metrics

    monkeypatch.setattr(Trainer, "eval_step", scripted)
    config = make_config(tmp_path, epochs=len(objective), steps_per_epoch=1, early_stopping_patience=50,
                         plateau={"factor": 0.5, "patience": 2})
    out, checkpoint = tmp_path / "model.pt", tmp_path / "checkpoint.pt"
    run_pretrain(config, PretrainJob("sar", tuple(dirs), out, checkpoint))
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    history = state["history"]
    assert [h["val/objective"] for h in history] == pytest.approx(objective)
    assert state["stopper"]["best_epoch"] == 2
    unet_lr = [h["lr/unet"] for h in history]
    base = config["pretrain"]["optimizer"]["lr"]
    # epochs 3 and 4 do not improve on epoch 2 (patience 2): the lr halves after epoch 5's step
    assert unet_lr[:6] == pytest.approx([base] * 6) and unet_lr[6] == pytest.approx(base / 2)
    assert {h["lr/discriminator"] for h in history} == {config["pretrain"]["methods"]["sar"]["lr"]["discriminator"]}
    best = torch.load(out, map_location="cpu", weights_only=True)
    assert best.keys() == state["best_weights"]["unet"].keys()
    assert all(torch.equal(best[k], state["best_weights"]["unet"][k]) for k in best)
