"""SepaReg 3D: body mask and supervoxel partition, the cached artefact, views, k-means, SimSiam and distillation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import peers_fixtures as fx
import pytest
import torch

from sar3d.io import InputDataError, save_volume, write_json
from sar3d.nets.unet import ENCODER_PREFIXES, UNet3D
from sar3d.paths import MANIFEST
from sar3d.pretraining import registry
from sar3d.pretraining.methods.separeg_learning import (
    SiameseBranch,
    distillation_step,
    kmeans_clusters,
    make_experts,
    region_embeddings,
    simsiam_step,
)
from sar3d.pretraining.methods.separeg_regions import (
    RegionConfig,
    Regions,
    body_mask,
    compute_regions,
    load_regions,
    region_crop,
    save_regions,
)
from sar3d.pretraining.methods.separeg_views import RandomGaussianBlur3d, RegionViews
from sar3d.pretraining.run import Trainer

SMALL = (32, 32, 16)  # half-size crops keep the training tests cheap on a shared CPU


@pytest.fixture(scope="module")
def separated() -> list[tuple[np.ndarray, Regions]]:
    cfg = RegionConfig(out_size=SMALL)
    out = []
    for kind, index in (("chest_ct", 0), ("liver_ct", 0), ("brain_mri", 0)):
        volume, spacing = fx.phantom_volume(kind, index)
        out.append((volume, compute_regions(volume, spacing, cfg, source=f"{kind}_{index}")))
    return out


def test_body_mask_keeps_the_largest_component_and_fills_holes() -> None:
    volume = np.zeros((30, 30, 12), dtype=np.float32)
    volume[5:25, 5:25, 2:10] = 0.8
    volume[12:18, 12:18, 4:8] = 0.0  # an enclosed cavity
    volume[10:14, 10:14, 0:12] = 0.0  # a channel open at both ends: a hole in each axial slice only
    volume[27:29, 27:29, 5:7] = 0.9  # a small separate blob
    mask = body_mask(volume, 0.05)
    expected = np.zeros_like(mask)
    expected[5:25, 5:25, 2:10] = True
    np.testing.assert_array_equal(mask, expected)


def test_regions_partition_the_body_mask(separated: list[tuple[np.ndarray, Regions]]) -> None:
    cfg = RegionConfig()
    for volume, regions in separated:
        mask = body_mask(volume, cfg.threshold)
        np.testing.assert_array_equal(regions.labels > 0, mask)  # inside the mask and covering it
        # a label map is disjoint by construction; every sample region is a label of it with its own box
        assert len(regions) >= 8
        assert len(np.unique(regions.region_ids)) == len(regions)
        for i, k in enumerate(regions.region_ids):
            where = np.argwhere(regions.labels == k)
            np.testing.assert_array_equal(where.min(0), regions.lower[i])
            np.testing.assert_array_equal(where.max(0) + 1, regions.upper[i])
            assert regions.voxels[i] == len(where)


def test_region_crop_is_the_masked_region(separated: list[tuple[np.ndarray, Regions]]) -> None:
    volume, regions = separated[0]
    k = 0
    box = tuple(slice(lo, up) for lo, up in zip(regions.lower[k], regions.upper[k], strict=True))
    crop = region_crop(volume, regions, k, tuple(int(v) for v in regions.upper[k] - regions.lower[k]))
    inside = regions.labels[box] == regions.region_ids[k]
    np.testing.assert_allclose(crop[inside], volume[box][inside], atol=1e-6)
    assert np.all(crop[~inside] == 0)
    assert region_crop(volume, regions, k, SMALL).shape == SMALL


def test_artefact_round_trip_is_atomic_and_errors_name_the_file(
    tmp_path: Path, separated: list[tuple[np.ndarray, Regions]]
) -> None:
    _, regions = separated[0]
    path = tmp_path / "case.npz"
    save_regions(path, regions)
    loaded = load_regions(path)
    for name in ("labels", "region_ids", "lower", "upper", "voxels", "spacing"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(regions, name))
    assert [p.name for p in tmp_path.iterdir()] == ["case.npz"]  # no temporary left behind
    np.savez(tmp_path / "other.npz", labels=regions.labels)
    with pytest.raises(InputDataError, match=r"other\.npz.*missing"):
        load_regions(tmp_path / "other.npz")
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(InputDataError, match=r"junk\.npz"):
        load_regions(tmp_path / "junk.npz")
    with pytest.raises(InputDataError, match="empty_case"):
        compute_regions(np.zeros((8, 8, 8), np.float32), (1.0, 1.0, 1.0), RegionConfig(), source="empty_case")


def test_views_are_seeded_and_stay_in_range() -> None:
    crops = torch.rand(4, 1, *SMALL, generator=torch.Generator().manual_seed(0))
    views = RegionViews()
    a1, a2 = views(crops, torch.Generator().manual_seed(5))
    b1, b2 = views(crops, torch.Generator().manual_seed(5))
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert not torch.equal(a1, a2)
    assert a1.shape == crops.shape and a1.min() >= 0 and a1.max() <= 1
    constant = torch.full((2, 1, 8, 8, 8), 0.4)
    blurred = RandomGaussianBlur3d(prob=1.0)(constant, torch.Generator().manual_seed(1))
    torch.testing.assert_close(blurred, constant)


def test_kmeans_assignment_is_deterministic_for_a_seed() -> None:
    points = np.random.default_rng(0).normal(size=(60, 8)).astype(np.float32)
    first = kmeans_clusters(points, 4, seed=123)
    np.testing.assert_array_equal(first, kmeans_clusters(points, 4, seed=123))
    assert set(first.tolist()) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="k=4"):
        kmeans_clusters(points[:3], 4, seed=1)


def region_batch(separated: list[tuple[np.ndarray, Regions]], per_volume: int) -> torch.Tensor:
    crops = [region_crop(volume, regions, i, SMALL) for volume, regions in separated
             for i in np.linspace(0, len(regions) - 1, per_volume).astype(int)]
    return torch.from_numpy(np.stack(crops))[:, None]


def view_similarity(branch: SiameseBranch, crops: torch.Tensor, seed: int) -> tuple[float, float]:
    """Mean cosine of two views of the same region, and of views of different regions."""
    v1, v2 = RegionViews()(crops, torch.Generator().manual_seed(seed))
    e1 = torch.from_numpy(region_embeddings(branch, v1))
    e2 = torch.from_numpy(region_embeddings(branch, v2))
    sim = e1 @ e2.T
    n = sim.shape[0]
    same = float(sim.diagonal().mean())
    other = float((sim.sum() - sim.diagonal().sum()) / (n * n - n))
    return same, other


def test_two_views_of_a_region_end_closer_than_views_of_different_regions(
    separated: list[tuple[np.ndarray, Regions]]
) -> None:
    with fx.one_thread():
        check_views_end_closer(separated)


def check_views_end_closer(separated: list[tuple[np.ndarray, Regions]]) -> None:
    torch.manual_seed(0)
    branch = SiameseBranch(UNet3D(1, 1, width=0.125), hidden=64, out=32)
    optimiser = torch.optim.SGD(branch.parameters(), lr=0.05, momentum=0.9)
    train = region_batch(separated, 8)
    views = RegionViews()
    generator = torch.Generator().manual_seed(1)
    losses = []
    for step in range(30):
        pick = torch.randperm(train.shape[0], generator=generator)[:8]
        losses.append(float(simsiam_step(branch, optimiser, *views(train[pick], generator))))
        assert np.isfinite(losses[-1]), step
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    same, other = view_similarity(branch, region_batch(separated, 4), seed=99)
    assert same > other + 0.05, (same, other)


def test_distillation_moves_only_the_student(separated: list[tuple[np.ndarray, Regions]]) -> None:
    with fx.one_thread():
        check_distillation(separated)


def check_distillation(separated: list[tuple[np.ndarray, Regions]]) -> None:
    torch.manual_seed(0)
    shared = SiameseBranch(UNet3D(1, 1, width=0.125), hidden=32, out=16)
    crops = region_batch(separated, 4)
    clusters = kmeans_clusters(region_embeddings(shared, crops), 2, seed=7)
    experts = make_experts(shared, 2)
    student = SiameseBranch(UNet3D(1, 1, width=0.125), hidden=32, out=16)
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in (shared, *experts)]
    optimiser = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(3)
    losses = []
    for step in range(12):
        cluster = step % 2
        members = torch.from_numpy(np.flatnonzero(clusters == cluster))
        if members.numel() < 2:
            members = torch.arange(crops.shape[0])
        batch = crops[members[:6]]
        losses.append(float(distillation_step(student, [experts[cluster], shared], optimiser,
                                              *RegionViews()(batch, generator))))
    assert np.mean(losses[-4:]) < np.mean(losses[:4])
    for saved, module in zip(before, (shared, *experts), strict=True):
        for key, value in module.state_dict().items():
            assert torch.equal(saved[key], value), key
        assert all(p.grad is None for p in module.parameters())


def test_separeg_artefact_and_phases_through_the_seam(tmp_path: Path) -> None:
    """Regions are made once per case by the artefact hook; SimSiam, then k-means, experts and distillation."""
    block = {"kind": "separeg", "regions_per_volume": 2, "clusters": 2, "bank_size": 16, "inter_fraction": 0.25,
             "hidden": 32, "projection": 16}
    config = fx.method_config("separeg", block)
    kinds = ["chest_ct", "liver_ct"]
    volumes = tmp_path / "volumes"
    entries = []
    for kind in kinds:
        volume, spacing = fx.phantom_volume(kind)
        for channel in (0, 1):  # two channels of one case share one partition
            save_volume(volumes / f"images/{kind}_c{channel}.nii.gz", volume, np.diag([*spacing, 1.0]))
            entries.append({"case": kind, "channel": channel, "image": f"images/{kind}_c{channel}.nii.gz"})
    write_json(volumes / MANIFEST, {"dataset": "phantoms", "modality": "CT", "cases": entries})
    cls = registry.method_class(config, "separeg")
    cls.make_artefact(config, "separeg", "regions", volumes, tmp_path / "regions")
    assert sorted(p.name for p in (tmp_path / "regions").iterdir()) == ["chest_ct.npz", "liver_ct.npz"]

    with fx.one_thread():
        method = registry.build(config, "separeg", torch.device("cpu"))
        method.artefact_dirs = {"regions": (tmp_path / "regions",)}
        trainer = Trainer.single(method)
        generator = torch.Generator().manual_seed(0)
        raw = fx.volume_batch(kinds * 2)
        phases = []
        for _ in range(method.inter_steps + 1):
            terms = trainer.train_step(method.make_views(raw, generator))
            phases.append("loss_simsiam" in terms)
    assert phases == [True] * method.inter_steps + [False]
    assert {"loss_distil_shared", "loss_distil_experts", "objective"} <= set(terms)
    assert bool(method.heads["phase"].clustered)
    exported = method.exported(method.unet.state_dict())
    assert exported and all(k.startswith(ENCODER_PREFIXES) for k in exported)  # fine-tuning gets the encoder
    assert not any(k.startswith(("up_tr", "out_tr")) for k in exported)
