"""The restoration figure: what the restoration pre-training learnt, seen on held-out cubes.

One row per Models Genesis corruption applied *alone* (local pixel shuffling,
non-linear intensity, in-painting, out-painting), each with the study's own
``pretrain.transforms`` sizes and its probability forced to 1; columns: the
corrupted cube, each restoration model's output and the original, on the middle
axial slice, grey levels fixed to [0, 1] so an intensity change stays visible.
Titles give the MSE against the original of the cube shown: the corrupted
input's (what doing nothing scores) and each restoration's; a model restores
when its MSE is below the corrupted one.

Which methods restore is read from the code, not from names: the kinds that are
:class:`~sar3d.pretraining.methods.genesis.Genesis` or a subclass (Genesis and the
SAR family) and export the whole U-Net (``export = encoder_decoder``), whose one
output channel is the restored intensity. The Taleb et al. tasks and SepaReg
export the encoder only, and VectorPOSE's two channels are no restoration of
this corruption, so they are never shown.

The cubes are each pre-training dataset's first validation cube of the largest
scale (the cases pre-training never trains on); row ``r`` shows the ``r``-th
dataset's cube, cycling, so every modality appears. Models run on the CPU with
batch statistics in BN (:func:`sar3d.nets.unet.batch_statistics`), as in
pre-training, on one batch holding every corrupted cube (pre-training batches
mix the corruptions too).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from sar3d import paths
from sar3d.grid import all_inits
from sar3d.io import InputDataError, read_json
from sar3d.nets.unet import UNet3D, batch_statistics
from sar3d.nets.weights import load_state_dict_file
from sar3d.paths import MANIFEST
from sar3d.pretraining.base import ENCODER_DECODER
from sar3d.pretraining.methods.genesis import Genesis
from sar3d.pretraining.registry import display_name, method_class, table_order
from sar3d.pretraining.transforms.intensity import nonlinear_intensity
from sar3d.pretraining.transforms.paint import paint
from sar3d.pretraining.transforms.settings import GenesisConfig
from sar3d.pretraining.transforms.shuffle import local_pixel_shuffle
from sar3d.reporting.figures import _pyplot, figure_paths, save_figure
from sar3d.schema import ConfigError
from sar3d.seeding import torch_generator

log = logging.getLogger(__name__)

FIGURE = "restoration"  # results/figures/restoration.{png,svg}
MAX_METHODS = 4  # columns of restored cubes when the config names none and genesis/reference are absent
DEFAULT_METHODS = ("genesis",)  # shown with report.reference when the config names no methods


@dataclass(frozen=True)
class Corruption:
    """One Models Genesis transform alone: its function and the settings that make it always apply.

    Args:
        name: the row's label.
        forced: ``GenesisConfig`` fields overriding the study's (probabilities set to 1 or 0).
        apply: the batched transform, ``(cubes, generator, settings) -> cubes``.
    """

    name: str
    forced: Mapping[str, float]
    apply: Callable[[Tensor, torch.Generator, GenesisConfig], Tensor]


CORRUPTIONS = (
    Corruption("local pixel shuffling", {"local_shuffle_rate": 1.0}, local_pixel_shuffle),
    Corruption("non-linear intensity", {"nonlinear_rate": 1.0}, nonlinear_intensity),
    Corruption("in-painting", {"paint_rate": 1.0, "inpaint_rate": 1.0}, paint),
    Corruption("out-painting", {"paint_rate": 1.0, "inpaint_rate": 0.0}, paint),
)


@dataclass
class RestorationRow:
    """One row of the figure: a corruption of one cube, its restorations and their MSE.

    Args:
        transform: the corruption's name.
        cube: which cube (dataset, case, channel).
        corrupted: the corrupted cube, ``(X, Y, Z)``.
        original: the cube before corruption.
        restored: each method's output.
        mse: mean squared error against ``original`` of ``"corrupted"`` and of each method's output.
    """

    transform: str
    cube: str
    corrupted: np.ndarray
    original: np.ndarray
    restored: dict[str, np.ndarray]
    mse: dict[str, float]


# --------------------------------------------------------------------------- which methods


def is_restoration_method(config: Mapping[str, Any], name: str) -> bool:
    """Whether block ``name`` restores intensities: a Genesis kind (or subclass) exporting the whole U-Net."""
    cls = method_class(config, name)
    return issubclass(cls, Genesis) and cls.export == ENCODER_DECODER


def restoration_methods(config: Mapping[str, Any]) -> list[str]:
    """The methods the figure shows, among the restoration methods the study pre-trains.

    ``report.restoration_methods`` when set; else ``genesis`` and ``report.reference``
    where they are restoration methods of the study; else the first
    :data:`MAX_METHODS` restoration methods in the tables' order. Raises
    :class:`~sar3d.schema.ConfigError` for a configured name that is not one.
    """
    candidates = [i for i in all_inits(config) if i in config["pretrain"]["methods"]
                  and is_restoration_method(config, i)]
    chosen = config["report"].get("restoration_methods")
    if chosen is not None:
        wrong = [m for m in chosen if m not in candidates]
        if wrong:
            raise ConfigError(
                f"config key 'report.restoration_methods': {', '.join(wrong)} not among the restoration methods "
                f"the study pre-trains ({', '.join(candidates) or 'none'})"
            )
        return table_order(config, list(chosen))
    preferred = [m for m in (*DEFAULT_METHODS, config["report"]["reference"]) if m in candidates]
    return table_order(config, preferred) if preferred else table_order(config, candidates)[:MAX_METHODS]


# --------------------------------------------------------------------------- inputs


def validation_cubes(folders: Sequence[Path]) -> tuple[Tensor, list[str]]:
    """Each shard's first validation cube of its largest scale: ``(N, 1, X, Y, Z)`` and a label per cube.

    A shard without validation cubes is left out (logged); none at all is an
    :class:`~sar3d.io.InputDataError`.
    """
    cubes, labels = [], []
    for folder in map(Path, folders):
        manifest = read_json(folder / MANIFEST)
        meta = pd.read_csv(folder / "meta.csv")
        val = meta[meta["split"] == "val"]
        if val.empty:
            log.warning("%s has no validation cube: left out of the restoration figure", folder)
            continue
        row = val[val["scale_fraction"] == val["scale_fraction"].max()].iloc[0]
        try:
            array = np.load(folder / "cubes.npy", mmap_mode="r")
        except (OSError, ValueError) as err:
            raise InputDataError(folder / "cubes.npy", f"cannot memory-map ({err})") from err
        cubes.append(np.array(array[int(row["index"])], dtype=np.float32))
        labels.append(f"{manifest['dataset']} {row['case']} c{int(row['channel'])}")
    if not cubes:
        raise InputDataError(folders[0] if folders else Path("."), "no validation cube in any cube folder")
    return torch.from_numpy(np.stack(cubes)).unsqueeze(1), labels


def corrupt(cubes: Tensor, config: Mapping[str, Any]) -> Tensor:
    """Every cube under each corruption of :data:`CORRUPTIONS` alone: ``(T, N, 1, X, Y, Z)``.

    Each corruption draws from its own generator (study seed and its name), so
    the figure is the same on every run and adding a corruption changes no other.
    """
    base = GenesisConfig.from_config(config["pretrain"]["transforms"])
    out = []
    for corruption in CORRUPTIONS:
        generator = torch_generator(config["seed"], "figure", "restoration", corruption.name)
        out.append(corruption.apply(cubes, generator, dataclasses.replace(base, **corruption.forced)))
    return torch.stack(out)


def load_restorer(config: Mapping[str, Any], path: Path) -> UNet3D:
    """A pre-trained restoration U-Net (one output channel, sigmoid) from its ``model.pt``, in eval mode."""
    model = UNet3D(in_channels=1, out_channels=1, width=config["pretrain"]["width"], final_activation="sigmoid")
    try:
        model.load_state_dict(load_state_dict_file(path), strict=True)
    except RuntimeError as err:
        raise InputDataError(path, f"not a restoration U-Net of width {config['pretrain']['width']} ({err})") from err
    return model.eval()


def restore(model: nn.Module, batch: Tensor) -> Tensor:
    """``model``'s output on ``batch``, normalised by batch statistics as in pre-training, no gradients."""
    with torch.no_grad(), batch_statistics(model):
        return model(batch)


# --------------------------------------------------------------------------- rows and figure


def mse(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> float:
    """Mean squared error over every voxel (what the restoration loss minimises)."""
    return float(np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2))


def restoration_rows(
    config: Mapping[str, Any], cubes: Tensor, labels: Sequence[str], models: Mapping[str, nn.Module],
) -> list[RestorationRow]:
    """One :class:`RestorationRow` per corruption; row ``r`` shows cube ``r mod N``.

    Args:
        config: the study config (seed, ``pretrain.transforms``).
        cubes: clean cubes ``(N, 1, X, Y, Z)`` in [0, 1].
        labels: a name per cube.
        models: restorers by method name; each sees every corrupted cube in one batch.
    """
    corrupted = corrupt(cubes, config)  # (T, N, 1, X, Y, Z)
    flat = corrupted.flatten(0, 1)
    outputs = {name: restore(model, flat).float().reshape(corrupted.shape) for name, model in models.items()}
    rows = []
    for t, corruption in enumerate(CORRUPTIONS):
        n = t % cubes.shape[0]
        original = cubes[n, 0].numpy()
        shown = {"corrupted": corrupted[t, n, 0].numpy(), **{m: out[t, n, 0].numpy() for m, out in outputs.items()}}
        rows.append(RestorationRow(
            transform=corruption.name, cube=labels[n], corrupted=shown["corrupted"], original=original,
            restored={m: shown[m] for m in outputs}, mse={k: mse(v, original) for k, v in shown.items()},
        ))
    return rows


def plot_restoration(
    config: Mapping[str, Any], models: Mapping[str, Path], cubes: Sequence[Path], outs: Sequence[Path],
) -> list[RestorationRow]:
    """Write the restoration figure to ``outs`` (PNG, SVG) and return its rows.

    Args:
        config: the study config.
        models: each restoration method's ``model.pt``, by method name (the columns' order); a
            missing file leaves its column empty and says so.
        cubes: the pre-training datasets' cube folders.
        outs: the figure files.
    """
    plt = _pyplot()
    present = {m: Path(p) for m, p in models.items() if Path(p).exists()}
    for method in set(models) - set(present):
        log.warning("no pre-trained model for %s: its column stays empty", method)
    clean, labels = validation_cubes(cubes)
    rows = restoration_rows(config, clean, labels, {m: load_restorer(config, p) for m, p in present.items()})
    columns = ["corrupted", *models, "original"]
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(2.4 * len(columns), 2.7 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        z = row.original.shape[-1] // 2
        for c, column in enumerate(columns):
            ax = axes[r][c]
            ax.axis("off")
            if column == "corrupted":
                image, title = row.corrupted, f"{row.transform}\n{row.cube}\ncorrupted, MSE {row.mse['corrupted']:.4f}"
            elif column == "original":
                image, title = row.original, f"original\nz = {z}"
            elif column in row.restored:
                image, title = row.restored[column], f"{display_name(config, column)}\nMSE {row.mse[column]:.4f}"
            else:
                ax.set_title(f"{display_name(config, column)}\n(no model)", fontsize="small")
                continue
            ax.imshow(image[:, :, z].T, cmap="gray", vmin=0.0, vmax=1.0, origin="lower")
            ax.set_title(title, fontsize="small")
    fig.suptitle("Restoration of held-out validation cubes, one corruption per row "
                 "(MSE vs the original; lower than the corrupted input's = restored)", fontsize="small")
    save_figure(fig, outs)
    return rows


def run_restoration_all(config: Mapping[str, Any]) -> list[Path]:
    """The restoration figure from whichever models exist (``sar3d report-all``); nothing without one or cubes."""
    results = config["results_dir"]
    models = {m: paths.fill(paths.PRETRAINED, results, method=m) for m in restoration_methods(config)}
    cubes = [paths.fill(paths.CUBES, results, dataset=d) for d in config["pretrain"]["datasets"]]
    cubes = [c for c in cubes if (c / MANIFEST).exists()]
    if not cubes or not any(p.exists() for p in models.values()):
        log.warning("no cube shards or no pre-trained restoration model: restoration figure skipped")
        return []
    outs = figure_paths(config, FIGURE)
    plot_restoration(config, models, cubes, outs)
    return outs
