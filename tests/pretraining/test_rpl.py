"""3D-RPL: the label is the neighbour's grid offset (traced back in the cube), the loss learns, bad config fails."""

from __future__ import annotations

import itertools

import pytest
import taleb_fixtures as fx
import torch

from sar3d.pretraining.methods.patches import PretextNet, check_head, classification_terms
from sar3d.pretraining.methods.rpl import N_NEIGHBOURS, RPLViews, rpl_head

PATCH = (16, 16, 8)
# the reference's own label order: offsets of the 26 neighbours, raster order (z fastest), centre left out
REFERENCE = [o for o in itertools.product((-1, 0, 1), repeat=3) if any(o)]


def test_label_is_the_neighbours_grid_offset():
    cubes = fx.unique_cubes(40)
    patches, labels = RPLViews(fx.CUBE, PATCH)(cubes, torch.Generator().manual_seed(5))
    assert patches.shape == (40, 2, 1, *PATCH)
    corners = set()
    for b in range(len(cubes)):
        (vc, centre), (vn, neighbour) = (fx.locate(cubes, patches[b, i]) for i in range(2))
        assert vc == vn == b
        corners.add(centre)
        c, n = fx.cell_of(centre, PATCH, (3, 3, 3)), fx.cell_of(neighbour, PATCH, (3, 3, 3))
        assert c == (1, 1, 1)
        assert REFERENCE[int(labels[b])] == tuple(ni - ci for ni, ci in zip(n, c, strict=True))
    assert len(corners) > 1  # jitter moves the centre patch inside its cell


def test_draws_cover_every_label_and_repeat_with_the_seed():
    fx.draws_are_seeded_and_cover(RPLViews(fx.CUBE, PATCH), 500, N_NEIGHBOURS)
    fixed = RPLViews(fx.CUBE, PATCH, jitter=False).randomize(4, torch.Generator().manual_seed(1))[0]
    assert torch.equal(fixed[:, 0], fixed[:1, 0].expand(4, -1))  # evaluation: centred, no jitter


def test_rpl_loss_falls_on_phantom_cubes():
    cubes = fx.phantom_cubes()[:8]
    patches, labels = RPLViews(fx.CUBE, PATCH)(cubes, torch.Generator().manual_seed(1))
    unet = fx.small_unet()
    head = rpl_head(unet.encoder_channels[-1], PATCH, 32, check_head((2048, 1024), fx.WIDTH, N_NEIGHBOURS, "k"))
    net = PretextNet(unet, head)
    fx.assert_falls(fx.train([net], lambda: classification_terms(net(patches), labels, "rpl")["loss_rpl"], 24))


BAD_CONFIG = [
    ({"methods": {"rpl": {"patch": [16, 16, 4]}}}, "pretrain.methods.rpl.patch"),  # 4 cannot pass 3 poolings
    ({"methods": {"rpl": {"patch": [24, 24, 8]}}}, "pretrain.methods.rpl.patch"),  # 3 x 24 > 64
    ({"methods": {"rpl": {"hidden": [2048, 16]}}, "width": 1.0}, "pretrain.methods.rpl.hidden"),  # < 26 classes
    ({"methods": {"rpl": {"kind": "rpl3d"}}}, "pretrain.methods.rpl.kind"),  # unknown method
]


@pytest.mark.parametrize(("overrides", "key"), BAD_CONFIG)
def test_bad_config_fails_at_validation_naming_the_key(overrides, key):
    assert f"config key '{key}'" in fx.config_error(**overrides)


def test_pretrains_through_the_run_loop_and_fine_tunes_with_a_fresh_decoder(tmp_path):
    fx.assert_pretrains_and_hands_over_the_encoder_only("rpl", "loss_rpl", tmp_path)
