"""3D-CPC: views against a per-patch reference, positives from the predicted place of the same volume and
negatives never, a context that never sees the predicted rows, a falling loss, and bad config naming its key."""

from __future__ import annotations

import itertools

import pytest
import taleb_fixtures as fx
import torch

from sar3d.pretraining.methods.cpc import CPCHead, CPCViews, context_sequence, cpc_targets, cpc_terms
from sar3d.pretraining.methods.patches import PretextNet, scaled

CELL = (16, 16, 8)


def _identity_codes(batch: int) -> torch.Tensor:
    """Codes ``(B, 4, 4, 4, 4)`` that spell out their own (volume, x, y, z)."""
    grid = torch.cartesian_prod(torch.arange(batch), *(torch.arange(4),) * 3)
    return grid.reshape(batch, 4, 4, 4, 4).float()


def test_views_match_a_patch_by_patch_reference():
    cubes = fx.unique_cubes(3)
    views = CPCViews(fx.CUBE)
    params = views.randomize(3, torch.Generator().manual_seed(4))
    patches = views.apply(cubes, params)
    assert patches.shape == (3, 64, 1, *CELL)
    crop, kept = (61, 61, 30), (14, 14, 7)
    for b in range(3):
        sx, sy, sz = params.shift[b, 0].tolist()
        shifted = torch.zeros(1, *fx.CUBE, dtype=cubes.dtype)
        shifted[:, :crop[0], :crop[1], :crop[2]] = cubes[b, :, sx:sx + crop[0], sy:sy + crop[1], sz:sz + crop[2]]
        for n, (x, y, z) in enumerate(itertools.product(range(4), repeat=3)):
            cell = shifted[:, 16 * x:16 * x + 16, 16 * y:16 * y + 16, 8 * z:8 * z + 8]
            kx, ky, kz = params.keep[b, n].tolist()
            expected = torch.zeros_like(cell)
            expected[:, kx:kx + kept[0], ky:ky + kept[1], kz:kz + kept[2]] = \
                cell[:, kx:kx + kept[0], ky:ky + kept[1], kz:kz + kept[2]]
            if params.flip[b, n]:
                expected = expected.flip(1)
            assert torch.equal(patches[b, n], expected)
    assert params.flip.any() and not params.flip.all()


def test_positives_come_from_the_predicted_place_of_the_same_volume_and_negatives_never_do():
    batch = 5
    codes = _identity_codes(batch)
    _, negatives = CPCViews(fx.CUBE)(torch.zeros(batch, 1, *fx.CUBE), torch.Generator().manual_seed(0))
    positives, negative_codes = cpc_targets(codes, negatives)
    other_volume = other_column = 0
    for b, (y, z) in itertools.product(range(batch), itertools.product(range(4), repeat=2)):
        column = 4 * y + z
        for k, x in enumerate((2, 3)):
            assert positives[b, column, k].tolist() == [b, x, y, z]
            nb, nx, ny, nz = negative_codes[b, column, k].tolist()
            assert nx == x and (nb, ny, nz) != (b, y, z)
        other_volume += nb != b
        other_column += nb == b
    assert other_volume and other_column  # negatives come from other volumes and from other columns


def test_context_is_the_mirrored_row0_neighbourhood_then_row1_and_never_rows_2_3():
    codes = _identity_codes(2)
    context = context_sequence(codes)
    assert context.shape == (2, 16, 10, 4)

    def mirror(i: int) -> int:
        return -i if i < 0 else (6 - i if i > 3 else i)

    for b, (y, z) in itertools.product(range(2), itertools.product(range(4), repeat=2)):
        expected = [[b, 0, mirror(y + dy), mirror(z + dz)] for dy, dz in itertools.product((-1, 0, 1), repeat=2)]
        assert context[b, 4 * y + z].tolist() == [*expected, [b, 1, y, z]]


def test_cpc_loss_falls_on_phantom_cubes():
    cubes = fx.phantom_cubes()[::8]  # one cube of each of the two volumes
    patches, negatives = CPCViews(fx.CUBE)(cubes, torch.Generator().manual_seed(1))
    unet = fx.small_unet()
    head = CPCHead(unet.encoder_channels[-1], CELL, scaled(1024, fx.WIDTH), scaled(256, fx.WIDTH))
    net = PretextNet(unet, head)
    fx.assert_falls(fx.train([net], lambda: cpc_terms(net(patches), negatives)["loss_cpc"], 24))


BAD_CONFIG = [
    ({"cubes": {"size": [64, 64, 48]}}, "pretrain.methods.cpc"),  # 48 does not split into 4 cells of 8k
    ({"cubes": {"size": [64, 64, 16]}}, "pretrain.methods.cpc"),  # cells of 4 cannot pass three poolings
    ({"methods": {"cpc": {"crop": 0.3}}}, "pretrain.methods.cpc.crop"),
    ({"methods": {"cpc": {"context": 4}}}, "pretrain.methods.cpc"),  # 4 x 0.125 leaves less than 2 GRU units
    ({"methods": {"cpc": {"negatives": 3}}}, "pretrain.methods.cpc"),  # unknown setting
]


@pytest.mark.parametrize(("overrides", "key"), BAD_CONFIG)
def test_bad_config_fails_at_validation_naming_the_key(overrides, key):
    assert f"config key '{key}'" in fx.config_error(**overrides)


def test_pretrains_through_the_run_loop_and_fine_tunes_with_a_fresh_decoder(tmp_path):
    fx.assert_pretrains_and_hands_over_the_encoder_only("cpc", "loss_cpc", tmp_path)
