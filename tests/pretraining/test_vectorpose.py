"""VectorPOSE: geometry against brute force, every orientation against the transformed image, targets, losses."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import numpy as np
import peers_fixtures as fx
import pytest
import torch
from scipy.ndimage import median_filter

from sar3d.data.cubes import resize_crops
from sar3d.nets.unet import UNet3D
from sar3d.pretraining import registry
from sar3d.pretraining.methods.vectorpose import VectorHead, boundary_losses, vector_losses, wrapped_l1
from sar3d.pretraining.methods.vectorpose_geometry import (
    CropBox,
    Orientation,
    crop_points,
    point_vectors,
    spherical_targets,
)
from sar3d.pretraining.methods.vectorpose_views import (
    BoundaryTarget,
    ConstantPaint,
    CropDraw,
    RandomVectorCrop,
    VectorPoseConfig,
    VectorPoseViews,
    separable_median,
)
from sar3d.pretraining.run import Trainer
from sar3d.pretraining.transforms.settings import GenesisConfig
from sar3d.schema import ConfigError

ORIENTATIONS = [
    Orientation(tuple(flips), tuple(turns))
    for flips in itertools.product((False, True), repeat=3)
    for turns in itertools.product((1, 3), repeat=3)
]


def brute_spherical(v: np.ndarray, shape: tuple[int, int, int]) -> list[float]:
    """r, theta, phi of one vector written out with ``math`` (z plays D, x plays H, y plays W)."""
    norm = math.sqrt(sum(c * c for c in v))
    radius = math.sqrt((shape[0] / 2) ** 2 + (shape[1] / 2) ** 2)
    if norm == 0:
        return [0.0, 0.0, 0.0]
    return [min(norm / radius, 1.0), math.acos(v[1] / norm) / math.pi, math.atan2(v[0], v[2]) / math.pi]


def assert_same_targets(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """r and theta equal; phi equal on the circle (phi = 1 and -1 are one direction: the sign of a zero)."""
    np.testing.assert_allclose(actual[..., :2].numpy(), expected[..., :2].numpy(), atol=1e-6)
    assert float(wrapped_l1(actual[..., 2], expected[..., 2]).max()) < 1e-6


def oriented_frame(orientation: Orientation, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Affine (A, b) with ``old centre = A @ new centre + b``, read off the transformed index volume."""
    index = torch.arange(math.prod(shape)).reshape(shape)
    moved = orientation.apply(index).numpy()
    new = np.stack(np.meshgrid(*[np.arange(n) for n in moved.shape], indexing="ij"), -1).reshape(-1, 3) + 0.5
    old = np.stack(np.unravel_index(moved.reshape(-1), shape), -1) + 0.5
    design = np.concatenate([new, np.ones((len(new), 1))], 1)
    solution, *_ = np.linalg.lstsq(design, old, rcond=None)
    return solution[:3].T, solution[3]


def test_points_and_vectors_of_a_known_crop_match_brute_force() -> None:
    shape = (40, 36, 20)
    box = CropBox((3, 5, 2), (10, 12, 6))
    lo, up = np.array(box.lower, float), np.array(box.upper, float)
    pick = {0: lo, 1: up}
    expected_points = [(lo + up) / 2] + [
        np.array([pick[a][0], pick[b][1], pick[c][2]])
        for a, b, c in [(0, 0, 0), (1, 1, 1), (0, 1, 1), (1, 0, 0), (0, 0, 1), (1, 1, 0), (0, 1, 0), (1, 0, 1)]
    ]
    np.testing.assert_array_equal(crop_points(box), np.stack(expected_points))
    centre = np.array([shape[0] / 2, shape[1] / 2, (lo[2] + up[2]) / 2])
    expected_vectors = np.stack([centre - p for p in expected_points])
    np.testing.assert_allclose(point_vectors(box, shape), expected_vectors)
    expected = np.array([brute_spherical(v, shape) for v in expected_vectors])
    np.testing.assert_allclose(spherical_targets(expected_vectors, shape).numpy(), expected, atol=1e-6)


def test_zero_vector_and_clipping() -> None:
    shape = (10, 10, 10)
    targets = spherical_targets(np.array([[0.0, 0.0, 0.0], [100.0, 0.0, 0.0]]), shape).numpy()
    np.testing.assert_array_equal(targets[0], [0, 0, 0])
    assert targets[1, 0] == 1.0  # r clipped
    np.testing.assert_allclose(targets[1, 1:], [0.5, 0.5], atol=1e-6)


@pytest.mark.parametrize("orientation", ORIENTATIONS, ids=str)
def test_every_orientation_agrees_with_the_transformed_volume(orientation: Orientation) -> None:
    """Rotate the whole volume, find the crop and the centre there, recompute the vectors and compare."""
    shape = (13, 11, 9)
    volume = torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape).numpy() / math.prod(shape)
    box = CropBox((2, 3, 1), (6, 4, 5))
    a, b = oriented_frame(orientation, shape)
    to_new = np.linalg.inv(a)

    # the crop, transformed, is the transformed volume's crop at the transformed box
    corners = np.array([[x, y, z] for x in (box.lower[0], box.upper[0]) for y in (box.lower[1], box.upper[1])
                        for z in (box.lower[2], box.upper[2])], dtype=float)
    moved = (corners - b) @ to_new.T
    new_lo, new_up = np.rint(moved.min(0)).astype(int), np.rint(moved.max(0)).astype(int)
    rotated_volume = orientation.apply(torch.from_numpy(volume)).numpy()
    rotated_crop = orientation.apply(torch.from_numpy(volume[box.slices()])).numpy()
    new_box = tuple(slice(lo, up) for lo, up in zip(new_lo, new_up, strict=True))
    np.testing.assert_array_equal(rotated_crop, rotated_volume[new_box])

    # vectors recomputed in the rotated frame from the rotated points and the rotated centre
    points = crop_points(box)
    centre = np.array([shape[0] / 2, shape[1] / 2, points[0, 2]])
    new_points = (points - b) @ to_new.T
    new_centre = (centre - b) @ to_new.T
    brute = new_centre[None] - new_points
    np.testing.assert_allclose(point_vectors(box, shape) @ orientation.matrix().T, brute, atol=1e-9)

    # the full view: image and targets of RandomVectorCrop.apply
    cfg = VectorPoseConfig(out_size=tuple(rotated_crop.shape))
    image, targets = RandomVectorCrop(cfg).apply(volume, CropDraw(box, orientation))
    np.testing.assert_allclose(image, resize_crops(rotated_crop[None], cfg.out_size)[0], atol=1e-6)
    expected = torch.tensor([brute_spherical(v, shape) for v in brute], dtype=torch.float32)
    assert_same_targets(targets, expected)


def test_crop_extent_keeps_the_output_aspect_after_orientation() -> None:
    cfg = VectorPoseConfig()
    crop = RandomVectorCrop(cfg)
    generator = torch.Generator().manual_seed(3)
    shape = (200, 200, 200)
    for _ in range(20):
        draw = crop.randomize(shape, generator)
        oriented = np.abs(draw.orientation.matrix()) @ np.array(draw.box.size)
        ratio = oriented / np.array(cfg.out_size)
        assert ratio.max() - ratio.min() < 2.0 / 32  # one voxel of rounding on the short axis
        assert cfg.scale_range[0] - 1 / 32 <= ratio.mean() <= cfg.scale_range[1] + 1 / 32
        assert all(lo >= 0 and lo + s <= n for lo, s, n in zip(draw.box.lower, draw.box.size, shape, strict=True))


@pytest.mark.parametrize("median", ["separable", "cube"])
def test_boundary_target_zero_on_constant_and_peaks_on_a_step_edge(median: str) -> None:
    target = BoundaryTarget(median=median)
    assert np.all(target(np.full((32, 32, 16), 0.7, dtype=np.float32)) == 0)
    step = np.full((32, 32, 16), 0.2, dtype=np.float32)
    step[16:] = 0.8
    edges = target(step)
    profile = edges[:, 16, 8]
    assert profile.max() == edges.max() > 0.5
    assert int(profile.argmax()) in (15, 16)
    assert np.all(profile[:12] == 0) and np.all(profile[20:] == 0)
    assert edges.min() >= 0 and edges.max() <= 1


def slow_median_along(image: np.ndarray, axis: int, size: int) -> np.ndarray:
    """Median of ``size`` voxels along ``axis``, borders mirrored with the edge voxel repeated (scipy's reflect)."""
    half = size // 2
    pad = [(0, 0)] * image.ndim
    pad[axis] = (half, half)
    padded = np.pad(image, pad, mode="symmetric")
    out = np.empty_like(image)
    for i in range(image.shape[axis]):
        window = np.take(padded, range(i, i + size), axis=axis)
        np.put_along_axis(out, np.full([1 if a == axis else n for a, n in enumerate(image.shape)], i),
                          np.expand_dims(np.median(window, axis=axis), axis), axis=axis)
    return out


def test_separable_median_is_three_1d_medians_in_turn() -> None:
    image = np.random.default_rng(3).random((12, 10, 7)).astype(np.float32)
    expected = image
    for axis in range(3):
        expected = slow_median_along(expected, axis, 5)
    np.testing.assert_array_equal(separable_median(image, 5), expected)
    assert not np.array_equal(expected, median_filter(image, size=5))  # an approximation, not the cubic median


def test_separable_median_removes_a_single_voxel_spike() -> None:
    image = np.full((16, 16, 8), 0.3, dtype=np.float32)
    image[8, 7, 4] = 1.0
    np.testing.assert_array_equal(separable_median(image), np.full_like(image, 0.3))
    assert np.all(BoundaryTarget()(image) == 0)


def test_cube_median_is_the_exact_cubic_median() -> None:
    image = np.random.default_rng(4).random((12, 10, 7)).astype(np.float32)
    np.testing.assert_array_equal(BoundaryTarget(median="cube").smooth(image), median_filter(image, size=5))
    with pytest.raises(ValueError, match="median"):
        BoundaryTarget(median="box")


def test_wraparound_loss_is_zero_across_the_seam() -> None:
    pred = torch.tensor([1.0, -1.0, 0.9, 0.3])
    target = torch.tensor([-1.0, 1.0, -0.9, 0.1])
    np.testing.assert_allclose(wrapped_l1(pred, target).numpy(), [0.0, 0.0, 0.2, 0.2], atol=1e-6)
    raw = torch.zeros(2, 9, 3)
    raw[0, :, 2], raw[1, :, 2] = 20.0, -20.0  # tanh saturates to exactly +-1 in float32
    targets = torch.zeros(2, 9, 3)
    targets[0, :, 2], targets[1, :, 2] = -1.0, 1.0
    assert float(vector_losses(raw, targets)["loss_phi"]) == 0.0


def test_constant_paint_fills_one_value_per_cube() -> None:
    cubes = torch.rand(6, 1, 16, 16, 8, generator=torch.Generator().manual_seed(0))
    painted = ConstantPaint(GenesisConfig(paint_rate=1.0, inpaint_rate=0.5))(cubes, torch.Generator().manual_seed(1))
    for i in range(6):
        changed = painted[i] != cubes[i]
        assert changed.any()
        assert torch.unique(painted[i][changed]).numel() == 1
    untouched = ConstantPaint(GenesisConfig(paint_rate=0.0))(cubes, torch.Generator().manual_seed(1))
    assert torch.equal(untouched, cubes)


@pytest.fixture(scope="module")
def phantom_volume() -> np.ndarray:
    return fx.phantom_volume("chest_ct")[0]


def test_views_are_deterministic_and_well_formed(phantom_volume: np.ndarray) -> None:
    views = VectorPoseViews(VectorPoseConfig())
    first = views([phantom_volume], 2, torch.Generator().manual_seed(7))
    second = views([phantom_volume], 2, torch.Generator().manual_seed(7))
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    assert first.inputs.shape == first.clean.shape == first.boundary.shape == (2, 1, 64, 64, 32)
    assert first.vectors.shape == (2, 9, 3)
    r, theta, phi = first.vectors.unbind(-1)
    assert r.min() >= 0 and r.max() <= 1 and theta.min() >= 0 and theta.max() <= 1 and phi.abs().max() <= 1
    assert not torch.equal(first.inputs, first.clean)  # corrupted


def test_config_rejects_unknown_keys_naming_the_block() -> None:
    with pytest.raises(ValueError, match=r"pretrain\.vectorpose.*scales"):
        VectorPoseConfig.from_config({"scales": [1]})
    cfg = VectorPoseConfig.from_config({"scale_range": [0.6, 1.2], "corruption": {"paint_rate": 0.5}})
    assert cfg.scale_range == (0.6, 1.2)
    assert cfg.corruption.paint_rate == 0.5 and cfg.corruption.flip_rate == 0.0


def test_losses_fall_over_a_few_dozen_steps(phantom_volume: np.ndarray) -> None:
    with fx.one_thread():
        check_losses_fall(phantom_volume)


def check_losses_fall(phantom_volume: np.ndarray) -> None:
    torch.manual_seed(0)
    # half-size views keep the test cheap on a shared CPU (the geometry does not depend on the size)
    batch = VectorPoseViews(replace(VectorPoseConfig(), out_size=(32, 32, 16), max_tries=3))(
        [phantom_volume], 4, torch.Generator().manual_seed(11)
    )
    unet = UNet3D(1, 2, width=0.125, final_activation="sigmoid")
    head = VectorHead(unet.encoder_channels[1:])
    optimiser = torch.optim.Adam([*unet.parameters(), *head.parameters()], lr=3e-3)
    history = []
    for _ in range(30):
        features = unet.encode(batch.inputs)
        terms = {**vector_losses(head(features), batch.vectors),
                 **boundary_losses(unet.decode(features), batch.clean, batch.boundary)}
        total = sum(terms.values())
        optimiser.zero_grad()
        total.backward()
        optimiser.step()
        history.append({k: float(v.detach()) for k, v in terms.items()})
    for key in history[0]:
        start = np.mean([h[key] for h in history[:3]])
        end = np.mean([h[key] for h in history[-3:]])
        assert end < start, (key, start, end)


def test_vectorpose_trains_through_the_seam() -> None:
    config = fx.method_config("vectorpose", {"kind": "vectorpose"})
    with fx.one_thread():
        method = registry.build(config, "vectorpose", torch.device("cpu"))
        trainer = Trainer.single(method)
        batch = method.make_views(fx.volume_batch(["chest_ct", "liver_ct"]), torch.Generator().manual_seed(0))
        terms = trainer.train_step(batch)
    assert batch["inputs"].shape == (2, 1, *config["cubes"]["size"])
    assert method.unet.out_channels == 2
    expected = {"loss_r", "loss_theta", "loss_phi", "loss_vector", "loss_recon", "loss_boundary", "objective"}
    assert expected <= set(terms)
    assert all(np.isfinite(float(v)) for v in terms.values())
    assert set(method.exported(method.unet.state_dict())) == set(method.unet.state_dict())
    assert registry.describe(config, "vectorpose").display == "VectorPOSE"
    assert method.views.boundary.median == "separable"
    cube = fx.method_config("vectorpose", {"kind": "vectorpose", "boundary_median": "cube"})
    assert registry.build(cube, "vectorpose", torch.device("cpu")).views.boundary.median == "cube"


@pytest.mark.parametrize(("name", "block", "key"), [
    ("vectorpose", {"kind": "vectorpose", "corruption": {"paint": 0.5}}, r"pretrain\.methods\.vectorpose\.corruption"),
    ("vectorpose", {"kind": "vectorpose", "boundary_median": "box"}, r"pretrain\.methods\.vectorpose\.boundary_median"),
    ("separeg", {"kind": "separeg", "regions": {"segments": 8}}, r"pretrain\.methods\.separeg\.regions"),
])
def test_block_typos_are_config_errors_naming_the_key(name: str, block: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        fx.method_config(name, block)
