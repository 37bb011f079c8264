"""The U-Net matches the Models Genesis state-dict layout; heads and weight loading behave."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from sar3d.io import InputDataError
from sar3d.nets.heads import ModalityDiscriminator, ScaleHead
from sar3d.nets.unet import UNet3D
from sar3d.nets.weights import count_parameters, load_state_dict_file, transfer_weights
from sar3d.training import devices


def _mg_conv(prefix: str, cin: int, cout: int) -> dict[str, tuple[int, ...]]:
    """Keys of one Models Genesis ``LUConv`` (conv 3^3 + ContBatchNorm3d)."""
    return {
        f"{prefix}.conv1.weight": (cout, cin, 3, 3, 3),
        f"{prefix}.conv1.bias": (cout,),
        f"{prefix}.bn1.weight": (cout,),
        f"{prefix}.bn1.bias": (cout,),
        f"{prefix}.bn1.running_mean": (cout,),
        f"{prefix}.bn1.running_var": (cout,),
        f"{prefix}.bn1.num_batches_tracked": (),
    }


def models_genesis_table(n_class: int = 1) -> dict[str, tuple[int, ...]]:
    """Expected key -> shape of the public Models Genesis ``UNet3D``, written from its description."""
    table: dict[str, tuple[int, ...]] = {}
    # encoder: DownTransition(in, depth): convs in -> 32*2^d -> 64*2^d
    for name, cin, depth in (("down_tr64", 1, 0), ("down_tr128", 64, 1), ("down_tr256", 128, 2),
                             ("down_tr512", 256, 3)):
        mid, out = 32 * 2**depth, 64 * 2**depth
        table |= _mg_conv(f"{name}.ops.0", cin, mid) | _mg_conv(f"{name}.ops.1", mid, out)
    # decoder: UpTransition(in, out, depth): up_conv in -> out, convs (in + out//2) -> 64*2^d -> 64*2^d
    for name, cin, depth in (("up_tr256", 512, 2), ("up_tr128", 256, 1), ("up_tr64", 128, 0)):
        width = 64 * 2**depth
        table[f"{name}.up_conv.weight"] = (cin, cin, 2, 2, 2)
        table[f"{name}.up_conv.bias"] = (cin,)
        table |= _mg_conv(f"{name}.ops.0", cin + cin // 2, width) | _mg_conv(f"{name}.ops.1", width, width)
    table["out_tr.final_conv.weight"] = (n_class, 64, 1, 1, 1)
    table["out_tr.final_conv.bias"] = (n_class,)
    return table


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def full_unet() -> UNet3D:
    torch.manual_seed(0)
    return UNet3D()


def test_state_dict_matches_models_genesis(full_unet: UNet3D) -> None:
    assert _shapes(full_unet) == models_genesis_table()
    assert _shapes(UNet3D(out_channels=3)) == models_genesis_table(n_class=3)


def test_parameter_count_is_19_07_million(full_unet: UNet3D) -> None:
    assert count_parameters(full_unet) == pytest.approx(19.07e6, rel=0.005)
    expected = sum(torch.Size(s).numel() for k, s in models_genesis_table().items()
                   if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert count_parameters(full_unet) == expected


def test_genesis_checkpoint_loads_strict(tmp_path: Path, full_unet: UNet3D) -> None:
    """A DataParallel checkpoint like Genesis_Chest_CT.pt: {"state_dict": {"module.<key>": ...}}."""
    source = {f"module.{k}": torch.randn(s) if s else torch.tensor(7) for k, s in models_genesis_table().items()}
    path = tmp_path / "Genesis_Chest_CT.pt"
    torch.save({"state_dict": source, "epoch": 3}, path)
    loaded = load_state_dict_file(path)
    assert set(loaded) == set(models_genesis_table())
    model = UNet3D()
    model.load_state_dict(loaded, strict=True)
    assert torch.equal(model.down_tr64.ops[0].conv1.weight, source["module.down_tr64.ops.0.conv1.weight"])
    assert torch.equal(model.up_tr64.ops[1].bn1.running_var, source["module.up_tr64.ops.1.bn1.running_var"])


def test_width_multiplier_scales_channels() -> None:
    net = UNet3D(width=0.25)
    assert net.encoder_channels == (16, 32, 64, 128)
    shapes = _shapes(net)
    assert shapes["down_tr64.ops.0.conv1.weight"] == (8, 1, 3, 3, 3)
    assert shapes["up_tr256.up_conv.weight"] == (128, 128, 2, 2, 2)
    assert shapes["up_tr256.ops.0.conv1.weight"] == (64, 128 + 64, 3, 3, 3)
    assert shapes["out_tr.final_conv.weight"] == (1, 16, 1, 1, 1)
    tiny = UNet3D(width=0.01)  # never below one channel
    assert min(tiny.encoder_channels) >= 1
    assert set(_shapes(net)) == set(models_genesis_table())


def test_encode_decode_shapes_and_channels_last(full_unet: UNet3D) -> None:
    full_unet.eval()
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        feats = full_unet.encode(x)
        assert [tuple(f.shape) for f in feats] == [(1, 64, 16, 16, 16), (1, 128, 8, 8, 8), (1, 256, 4, 4, 4),
                                                   (1, 512, 2, 2, 2)]
        out = full_unet.decode(feats)
        assert out.shape == x.shape
        assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0  # sigmoid
        out_cl = full_unet(x.to(memory_format=torch.channels_last_3d))
    torch.testing.assert_close(out_cl, out, atol=1e-5, rtol=1e-4)


def test_memory_format_changes_layout_not_the_function() -> None:
    """``auto`` puts the 5D weights (and so the activations) channels-last; the output matches contiguous."""
    torch.manual_seed(0)
    contiguous = devices.prepare_model(UNet3D(width=0.125), torch.device("cpu"), "contiguous")
    channels_last = devices.prepare_model(UNet3D(width=0.125), torch.device("cpu"), "auto")
    channels_last.load_state_dict(contiguous.state_dict())
    conv = channels_last.down_tr128.ops[0].conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last_3d) and not conv.is_contiguous()
    assert contiguous.down_tr128.ops[0].conv1.weight.is_contiguous()
    x = torch.rand(2, 1, 16, 16, 8)
    with torch.no_grad():
        out = channels_last.encode(x)[0]
        assert out.is_contiguous(memory_format=torch.channels_last_3d)  # a contiguous input needs no conversion
        torch.testing.assert_close(channels_last(x), contiguous(x), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="unknown memory format 'nhwc'"):
        devices.resolve_memory_format("nhwc")


def test_logits_without_final_activation() -> None:
    net = UNet3D(out_channels=2, width=0.125, final_activation=None).eval()
    with torch.no_grad():
        out = net(torch.rand(2, 1, 16, 16, 8) * 50)
    assert out.shape == (2, 2, 16, 16, 8)
    assert float(out.abs().max()) > 0
    with pytest.raises(ValueError, match="final_activation"):
        UNet3D(final_activation="tanh")


def test_heads_on_64x64x32_features() -> None:
    net = UNet3D(width=0.0625)  # 4, 8, 16, 32 encoder channels
    feats = [torch.rand(3, c, 64 // 2**i, 64 // 2**i, 32 // 2**i) for i, c in enumerate(net.encoder_channels)]
    head = ScaleHead(net.encoder_channels[-1], n_classes=3, hidden=16)
    assert head(feats[-1]).shape == (3, 3)
    disc = ModalityDiscriminator(net.encoder_channels, width=4, hidden=8)
    logits = disc(feats)
    assert logits.shape == (3,)
    # densely connected: every encoder level reaches the logit
    feats = [f.requires_grad_(True) for f in feats]
    disc(feats).sum().backward()
    assert all(f.grad is not None and float(f.grad.abs().sum()) > 0 for f in feats)


def test_discriminator_adapts_to_other_cube_sizes() -> None:
    disc = ModalityDiscriminator([4, 8, 16, 32], width=4, hidden=8)
    feats = [torch.rand(2, c, 24 // 2**i, 40 // 2**i, 16 // 2**i) for i, c in enumerate([4, 8, 16, 32])]
    assert disc(feats).shape == (2,)
    with pytest.raises(ValueError, match="feature maps"):
        disc(feats[:3])


def test_transfer_skips_output_layer_with_other_class_count() -> None:
    pretrained = UNet3D(width=0.125)
    with torch.no_grad():
        for p in pretrained.parameters():
            p.fill_(0.5)
    target = UNet3D(out_channels=3, width=0.125)
    skipped = transfer_weights(target, {f"module.{k}": v for k, v in pretrained.state_dict().items()})
    assert skipped == ["out_tr.final_conv.bias", "out_tr.final_conv.weight"]
    assert torch.all(target.down_tr512.ops[1].conv1.weight == 0.5)
    assert not torch.all(target.out_tr.final_conv.weight == 0.5)


def test_transfer_refuses_unrelated_weights() -> None:
    with pytest.raises(ValueError, match="no entry"):
        transfer_weights(UNet3D(width=0.125), {"fc.weight": torch.zeros(2, 2)})


class _Payload:
    """Any non-tensor object: weights_only loading must refuse it."""


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_load_refuses_pickled_objects(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": _Payload()}, path)
    with pytest.raises(InputDataError, match=r"evil\.pt.*weights-only"):
        load_state_dict_file(path)
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(InputDataError, match=r"plain\.pkl"):
        load_state_dict_file(plain)
    numbers = tmp_path / "numbers.pt"
    torch.save({"a": 1}, numbers)
    with pytest.raises(InputDataError, match="not a state dict"):
        load_state_dict_file(numbers)
    with pytest.raises(InputDataError, match="does not exist"):
        load_state_dict_file(tmp_path / "missing.pt")
