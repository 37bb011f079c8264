"""3D-Jig: the stored table regenerates from its seed, rows are unique, the label's permutation is the patches'
arrangement (traced back in the cube), the loss learns, and bad config names its key."""

from __future__ import annotations

import numpy as np
import pytest
import taleb_fixtures as fx
import torch

from sar3d.pretraining.methods.jigsaw import (
    PERMUTATIONS_FILE,
    JigsawViews,
    generate_permutations,
    jigsaw_head,
    load_permutations,
)
from sar3d.pretraining.methods.patches import PretextNet, check_head, classification_terms

PATCH = (16, 16, 8)


def test_stored_table_is_regenerated_by_its_seed_and_has_unique_rows():
    table = load_permutations()
    assert table.shape == (100, 27) and table.dtype == torch.int64
    assert torch.equal(generate_permutations(), table)
    assert len({tuple(row) for row in table.tolist()}) == len(table)
    assert all(sorted(row) == list(range(27)) for row in table.tolist())
    assert not torch.equal(generate_permutations(seed=1), table)


def test_label_permutation_is_the_arrangement_of_the_patches():
    cubes = fx.unique_cubes(6)
    patches, labels = JigsawViews(fx.CUBE, PATCH)(cubes, torch.Generator().manual_seed(2))
    assert patches.shape == (6, 27, 1, *PATCH)
    table = np.loadtxt(PERMUTATIONS_FILE, dtype=int)  # read independently of load_permutations
    for b in range(len(cubes)):
        cells = []
        for i in range(27):
            volume, corner = fx.locate(cubes, patches[b, i])
            assert volume == b
            x, y, z = fx.cell_of(corner, PATCH, (3, 3, 3))
            cells.append(9 * x + 3 * y + z)  # raster index, z fastest
        assert cells == table[int(labels[b])].tolist()


def test_draws_cover_the_table_and_repeat_with_the_seed():
    corners = fx.draws_are_seeded_and_cover(JigsawViews(fx.CUBE, PATCH), 2000, 100)
    assert len({tuple(c) for c in corners[:, 0].tolist()}) > 1  # jitter


def test_jigsaw_loss_falls_on_phantom_cubes():
    cubes = fx.phantom_cubes()[:4]
    patches, labels = JigsawViews(fx.CUBE, PATCH)(cubes, torch.Generator().manual_seed(1))
    unet = fx.small_unet()
    head = jigsaw_head(unet.encoder_channels[-1], PATCH, 32, check_head((2048, 1024), fx.WIDTH, 100, "k"))
    net = PretextNet(unet, head)
    fx.assert_falls(fx.train([net], lambda: classification_terms(net(patches), labels, "jig")["loss_jig"], 24))


BAD_CONFIG = [
    ({"methods": {"jigsaw": {"patch": [12, 16, 8]}}}, "pretrain.methods.jigsaw.patch"),  # 12: not a multiple of 8
    ({"methods": {"jigsaw": {"patch": [16, 16, 16]}}}, "pretrain.methods.jigsaw.patch"),  # 3 x 16 > 32
    ({"width": 0.04}, "pretrain.methods.jigsaw.hidden"),  # 1024 x 0.04 = 41 < 100 permutations
    ({"methods": {"jigsaw": {"permutations": 1000}}}, "pretrain.methods.jigsaw"),  # unknown setting
]


@pytest.mark.parametrize(("overrides", "key"), BAD_CONFIG)
def test_bad_config_fails_at_validation_naming_the_key(overrides, key):
    assert f"config key '{key}'" in fx.config_error(**overrides)


def test_pretrains_through_the_run_loop_and_fine_tunes_with_a_fresh_decoder(tmp_path):
    fx.assert_pretrains_and_hands_over_the_encoder_only("jigsaw", "loss_jig", tmp_path)
