"""The linear probe on toy problems whose answer is known, and on a U-Net's frozen features."""

from __future__ import annotations

import math

import torch

from sar3d.evaluation.probe import fit_linear_probe, probe_dice, probe_features
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


def test_unet_features_are_the_last_decoder_level_and_change_nothing():
    torch.manual_seed(0)
    net = UNet3D(width=0.125)
    net.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.rand(2, 1, 16, 16, 8)
    feats = probe_features(net, x)
    assert feats.shape == (2, net.encoder_channels[0], 16, 16, 8)
    assert not net.training
    for key, value in net.state_dict().items():
        torch.testing.assert_close(value, before[key], msg=key)
    with torch.no_grad():  # decode() is the output layer on these features
        net.train()
        torch.testing.assert_close(net.decode(net.encode(x)), torch.sigmoid(net.out_tr(feats)))
