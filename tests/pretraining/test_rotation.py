"""3D-Rot: the label is the rotation applied (against rotation matrices), the loss learns, bad config names its key."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import taleb_fixtures as fx
import torch

from sar3d.pretraining.methods.patches import PretextNet, check_head, classification_terms
from sar3d.pretraining.methods.rotation import (
    N_ROTATIONS,
    RotationHead,
    RotationViews,
)

SIDE = 32


def _matrix(axis: int, turns: int) -> np.ndarray:
    """Right-handed rotation by ``turns`` quarter turns about ``axis`` (x turns y into z, y turns z into x)."""
    c, s = [(1, 0), (0, 1), (-1, 0), (0, -1)][turns % 4]
    i, j = [(1, 2), (2, 0), (0, 1)][axis]
    m = np.eye(3, dtype=int)
    m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
    return m


# the slow reference's own class list: identity, then 1-3 quarter turns about x, y, z
REFERENCE = [np.eye(3, dtype=int)] + [_matrix(a, t) for a in range(3) for t in (1, 2, 3)]


def _reference_view(cube: np.ndarray, corner: tuple[int, ...], matrix: np.ndarray) -> np.ndarray:
    """Crop by slicing, then move the voxel at p to R (p - c) + c (every voxel's coordinates mapped)."""
    x, y, z = corner
    crop = cube[x:x + SIDE, y:y + SIDE, z:z + SIDE]
    out = np.full_like(crop, np.nan)
    centre = (SIDE - 1) / 2
    p = np.array(list(itertools.product(range(SIDE), repeat=3)))
    q = np.rint((p - centre) @ matrix.T + centre).astype(int)
    out[q[:, 0], q[:, 1], q[:, 2]] = crop[p[:, 0], p[:, 1], p[:, 2]]
    assert not np.isnan(out).any()
    return out


def test_label_is_the_rotation_applied():
    cubes = fx.unique_cubes(N_ROTATIONS + 2)
    views = RotationViews(fx.CUBE, SIDE)
    corners, labels = views.randomize(len(cubes), torch.Generator().manual_seed(3))
    labels = torch.arange(len(cubes)) % N_ROTATIONS  # every class at least once
    out = views.apply(cubes, corners, labels)
    assert out.shape == (len(cubes), 1, 1, SIDE, SIDE, SIDE)
    assert len({m.tobytes() for m in REFERENCE}) == N_ROTATIONS
    for b in range(len(cubes)):
        expected = _reference_view(cubes[b, 0].numpy(), tuple(corners[b, 0].tolist()), REFERENCE[int(labels[b])])
        np.testing.assert_array_equal(out[b, 0, 0].numpy(), expected)


def test_draws_cover_every_class_and_place_and_repeat_with_the_seed():
    corners = fx.draws_are_seeded_and_cover(RotationViews(fx.CUBE, SIDE), 400, N_ROTATIONS)
    assert corners[..., 0].max() == fx.CUBE[0] - SIDE and corners[..., 0].min() == 0
    assert (corners[..., 2] == 0).all()  # the 32-voxel axis has no room


def test_rotation_loss_falls_on_phantom_cubes():
    cubes = fx.phantom_cubes()[:8]
    views, labels = RotationViews(fx.CUBE, SIDE)(cubes, torch.Generator().manual_seed(1))
    unet = fx.small_unet()
    head = RotationHead(unet.encoder_channels[-1], SIDE, check_head((2048, 1024), fx.WIDTH, N_ROTATIONS, "k"))
    net = PretextNet(unet, head)
    fx.assert_falls(fx.train([net], lambda: classification_terms(net(views), labels, "rot")["loss_rot"], 24))


BAD_CONFIG = [
    ({"methods": {"rotation": {"side": 20}}}, "pretrain.methods.rotation.side"),  # not a multiple of 8
    ({"methods": {"rotation": {"side": 40}}}, "pretrain.methods.rotation.side"),  # beyond the 32-voxel axis
    ({"width": 0.004}, "pretrain.methods.rotation.hidden"),  # 2048 x 0.004 = 8 < 10 classes
    ({"methods": {"rotation": {"kind": "rotate3d"}}}, "pretrain.methods.rotation.kind"),  # unknown method
    ({"methods": {"rotation": {"angle": 90}}}, "pretrain.methods.rotation"),  # unknown setting
]


@pytest.mark.parametrize(("overrides", "key"), BAD_CONFIG)
def test_bad_config_fails_at_validation_naming_the_key(overrides, key):
    assert f"config key '{key}'" in fx.config_error(**overrides)


def test_pretrains_through_the_run_loop_and_fine_tunes_with_a_fresh_decoder(tmp_path):
    fx.assert_pretrains_and_hands_over_the_encoder_only("rotation", "loss_rot", tmp_path)
