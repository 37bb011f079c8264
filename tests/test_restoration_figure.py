"""The restoration figure: which methods it shows, one row per corruption, and the MSE it prints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from torch import Tensor, nn

from cubeshards import cube_folder
from sar3d.cli import main
from sar3d.config import load_config
from sar3d.nets.unet import UNet3D
from sar3d.reporting.restoration import (
    CORRUPTIONS,
    corrupt,
    is_restoration_method,
    plot_restoration,
    restoration_methods,
    restoration_rows,
    validation_cubes,
)
from sar3d.schema import ConfigError

REPO = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"
N_CUBES = 16  # per shard: indices 12-15 are the validation cubes, 12 the first of the largest scale


def _config(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    return load_config(REPO / "config.yaml", {"results_dir": str(tmp_path / "results"), **overrides})


@pytest.fixture
def shards(tmp_path: Path) -> list[Path]:
    return [cube_folder(tmp_path / "cubes" / "ct", "ct", 0, N_CUBES, 1),
            cube_folder(tmp_path / "cubes" / "mri", "mri", 1, N_CUBES, 2)]


def _random_model(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    torch.save(UNet3D(in_channels=1, out_channels=1, width=0.125, final_activation="sigmoid").state_dict(), path)
    return path


class PerfectRestorer(nn.Module):
    """Returns the originals of a batch laid out as ``corrupt(...).flatten(0, 1)``: a restorer with no error."""

    def __init__(self, cubes: Tensor) -> None:
        super().__init__()
        self.register_buffer("originals", cubes.repeat(len(CORRUPTIONS), 1, 1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        assert x.shape == self.originals.shape
        return self.originals.clone()


def test_the_restoration_methods_are_the_genesis_kinds_exporting_the_unet(tmp_path):
    config = _config(tmp_path)
    assert restoration_methods(config) == ["genesis", "sar"]  # genesis and report.reference
    for method in ("genesis", "sar", "sa", "mial", "sar_s2"):
        assert is_restoration_method(config, method), method
    for method in ("rpl", "jigsaw", "rotation", "cpc", "vectorpose", "separeg"):
        assert not is_restoration_method(config, method), method
    # neither genesis nor the reference restores: every restoration method, in the tables' order
    other = _config(tmp_path, report={"reference": "rpl"}, finetune={
        "inits": ["scratch", "rpl"], "full_label_inits": ["sa", "vectorpose", "mial", "separeg"],
        "ablation_inits": []})
    assert restoration_methods(other) == ["mial", "sa"]
    assert restoration_methods(_config(tmp_path, report={"restoration_methods": ["sar", "genesis"]})) == [
        "genesis", "sar"]
    with pytest.raises(ConfigError, match=r"report\.restoration_methods"):
        restoration_methods(_config(tmp_path, report={"restoration_methods": ["rpl"]}))


def test_one_row_per_corruption_on_validation_cubes(tmp_path, shards):
    config = _config(tmp_path)
    models = {"genesis": _random_model(tmp_path / "genesis.pt", 0), "sar": _random_model(tmp_path / "sar.pt", 1)}
    outs = [tmp_path / "figures" / "restoration.png", tmp_path / "figures" / "restoration.svg"]
    rows = plot_restoration(config, models, shards, outs)

    assert outs[0].read_bytes()[:8] == PNG and outs[0].stat().st_size > 1000
    assert b"<svg" in outs[1].read_bytes()[:2000]
    assert [r.transform for r in rows] == [c.name for c in CORRUPTIONS]
    first_val = [np.load(s / "cubes.npy")[12] for s in shards]
    for r, row in enumerate(rows):
        assert row.cube.split()[:2] == [["ct", "mri"][r % 2], f"{['ct', 'mri'][r % 2]}1"]  # the validation case
        np.testing.assert_array_equal(row.original, first_val[r % 2])
        # the corruption really applied: the input differs from the original, and its MSE says so
        assert np.abs(row.corrupted - row.original).max() > 1e-2, row.transform
        assert row.mse["corrupted"] > 0
        assert set(row.restored) == set(models) and all(np.isfinite(v) for v in row.mse.values())
    # the transforms are the named ones: painting leaves voxels untouched, the intensity curve moves them all
    changed = {row.transform: np.mean(~np.isclose(row.corrupted, row.original)) for row in rows}
    assert changed["in-painting"] < changed["out-painting"]
    assert changed["non-linear intensity"] > 0.5


def test_the_mse_shown_is_against_the_original(tmp_path, shards):
    config = _config(tmp_path)
    cubes, labels = validation_cubes(shards)
    torch.testing.assert_close(corrupt(cubes, config), corrupt(cubes, config))  # seeded: the same figure every run
    rows = restoration_rows(config, cubes, labels, {"perfect": PerfectRestorer(cubes), "identity": nn.Identity()})
    for row in rows:
        assert row.mse["perfect"] == 0.0
        np.testing.assert_array_equal(row.restored["identity"], row.corrupted)
        assert row.mse["identity"] == pytest.approx(row.mse["corrupted"]) and row.mse["identity"] > 0
        assert row.mse["corrupted"] == pytest.approx(float(np.mean((row.corrupted - row.original) ** 2.0)))


def test_the_cli_writes_the_figure(tmp_path, shards):
    config = _config(tmp_path)
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    outs = [tmp_path / "r.png", tmp_path / "r.svg"]
    model = _random_model(tmp_path / "model.pt", 0)
    assert main(["figure", "--config", str(tmp_path / "study.yaml"), "--kind", "restoration",
                 "--model", "genesis", str(model), "--cubes", *map(str, shards), "--out", *map(str, outs)]) == 0
    assert all(out.stat().st_size > 1000 for out in outs)
