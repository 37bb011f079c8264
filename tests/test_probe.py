"""The linear probe on toy problems whose answer is known, and on a U-Net's frozen features."""

from __future__ import annotations

import math

import torch

from sar3d.evaluation.probe import (
    LEVELS,
    fit_linear_probe,
    level_features,
    level_logits,
    level_target,
    probe_dice,
)
from sar3d.nets.unet import UNet3D


def _blobs(n: int, seed: int) -> torch.Tensor:
    """``n`` binary masks of 16x16x8 with one random box each (the 'tumours')."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(n, 1, 16, 16, 8)
    for i in range(n):
        x, y = (int(v) for v in torch.randint(0, 10, (2,), generator=g))
        z = int(torch.randint(0, 4, (1,), generator=g))
        masks[i, 0, x:x + 5, y:y + 5, z:z + 3] = 1
    return masks


def _noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_features_that_hold_the_label_give_dice_near_one():
    train, test = _blobs(6, 0), _blobs(4, 1)

    def features(masks: torch.Tensor, seed: int) -> torch.Tensor:
        # channel 0 carries the label (scaled, offset, noisy); 7 channels of pure noise
        noise = _noise((masks.shape[0], 8, *masks.shape[2:]), seed)
        noise[:, :1] = 3.0 * masks - 1.0 + 0.3 * noise[:, :1]
        return noise

    probe = fit_linear_probe(features(train, 10), train, seed=0)
    dice = probe_dice(probe, features(test, 11), test)
    assert min(dice) > 0.95, dice


def test_constant_features_give_the_floor():
    train, test = _blobs(6, 0), _blobs(4, 1)
    probe = fit_linear_probe(torch.ones(6, 8, 16, 16, 8), train, seed=0)
    dice = probe_dice(probe, torch.ones(4, 8, 16, 16, 8), test)
    # one constant answer for every voxel: all background (Dice 0) or all foreground (2|R| / (|V| + |R|))
    everywhere = [2 * float(t.sum()) / (t.numel() + float(t.sum())) for t in test]
    assert all(d == 0.0 or math.isclose(d, e) for d, e in zip(dice, everywhere, strict=True)), dice
    assert max(dice) < 0.2


def test_probe_is_seeded_and_reads_raw_features():
    train = _blobs(4, 2)
    feats = 5.0 + 2.0 * _noise((4, 4, 16, 16, 8), 3)
    feats[:, 0] += 16.0 * train[:, 0]  # 8 noise std apart
    a, b = fit_linear_probe(feats, train, steps=50, seed=7), fit_linear_probe(feats, train, steps=50, seed=7)
    torch.testing.assert_close(a.weight, b.weight)
    assert min(probe_dice(a, feats, train)) > 0.9  # the standardisation is folded into the weights


def test_unet_dec_features_are_the_last_decoder_level_and_change_nothing():
    torch.manual_seed(0)
    net = UNet3D(width=0.125)
    net.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.rand(2, 1, 16, 16, 8)
    feats = level_features(net, x)["dec"]
    assert feats.shape == (2, net.encoder_channels[0], 16, 16, 8)
    assert not net.training
    for key, value in net.state_dict().items():
        torch.testing.assert_close(value, before[key], msg=key)
    with torch.no_grad():  # decode() is the output layer on these features
        net.train()
        torch.testing.assert_close(net.decode(net.encode(x)), torch.sigmoid(net.out_tr(feats)))


def test_every_level_of_an_odd_sized_volume_maps_back_to_its_grid():
    """Volumes whose sides are not multiples of 8 are padded for the U-Net; masks and logits follow each level."""
    net = UNet3D(in_channels=1, out_channels=1, width=0.125)
    shape = (36, 34, 28)
    image = _noise((1, 1, *shape), 5)
    mask = torch.zeros(1, 1, *shape)
    mask[..., 8:24, 8:24, 8:16] = 1  # inside, on the coarsest grid's cells: every level holds it exactly
    levels = level_features(net, image)
    assert list(levels) == list(LEVELS)
    assert all(type(f) is torch.Tensor for f in levels.values())  # MONAI's padding leaves no MetaTensor behind
    fit_linear_probe(levels["dec"], level_target(mask, levels["dec"]), steps=2)  # the probe trains on them
    padded = (40, 40, 32)
    for name, factor in zip(LEVELS, (1, 2, 4, 8, 1), strict=True):
        features = levels[name]
        assert tuple(features.shape[2:]) == tuple(n // factor for n in padded), name
        target = level_target(mask, features)
        assert target.shape[2:] == features.shape[2:], name
        # a "probe" that outputs the pooled mask itself maps back onto the mask: no shift at any level
        identity = torch.nn.Conv3d(1, 1, 1)
        with torch.no_grad():
            identity.weight.fill_(20.0)
            identity.bias.fill_(-10.0)
        restored = level_logits(identity, target, shape) > 0
        assert restored.shape == (1, 1, *shape)
        # trilinear upsampling rounds a coarse box's corners off, it does not move the box
        assert probe_dice_from_masks(restored, mask) > (0.99 if factor == 1 else 0.7), name
        assert torch.allclose(_centre(restored), _centre(mask), atol=0.5), name


def _centre(mask: torch.Tensor) -> torch.Tensor:
    return torch.nonzero(mask[0, 0]).float().mean(dim=0)


def probe_dice_from_masks(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.bool(), b.bool()
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))
