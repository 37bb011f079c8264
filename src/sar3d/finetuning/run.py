"""Fine-tuning one (task, init, label ratio, fold) on its split (paper section 3.3).

* Model: ``UNet3D(out_channels = number of task classes, final_activation=None)``
  at the pre-training width. ``scratch`` is a seeded random init; any other init
  copies the pre-trained U-Net with :func:`sar3d.nets.unet.transfer_weights`
  (tensors whose shapes differ - the output layer when the class count is not 1
  - keep their seeded random init); skipped keys are logged. All layers train.
* Data: the split's ``train`` cases reduced to the label ratio with
  :func:`sar3d.data.splits.nested_label_subsets` (one seeded order per (task, fold), so
  1/5 ⊂ 1/2 ⊂ 1), and so are its ``val`` cases (their own seeded order, at least
  one case; ``finetune.label_ratio_validation: full`` keeps them all), so a
  ratio covers every annotated case the run touches, model selection included.
  Training cases are cached in memory (MONAI ``CacheDataset``) and cut into
  patches of ``finetune.patch_size`` by ``RandCropByPosNegLabeld`` with a share
  ``finetune.foreground_ratio`` of patches centred on foreground. Foreground is
  the union of the task's classes, held in its own ``fg`` key: MONAI treats
  channel 0 of a multi-channel label as one-hot background and would otherwise
  ignore the pancreas ``organ`` channel.
* Loss: MONAI ``DiceLoss(sigmoid=True, batch=True)`` over one channel per class
  (multi-label). ``batch=True`` (Dice over the whole batch, as nnU-Net) keeps a
  patch without tumour from contributing a degenerate per-sample Dice.
* Optimiser: Adam (``finetune.lr``, paper 1e-3); ``ReduceLROnPlateau`` and early
  stopping on the validation Dice loss, computed by sliding-window inference
  over the whole val volumes; the best epoch's weights are written to ``out``.

Randomness: the model init, the case order and the crops derive from the study
seed and (task, ratio, fold, epoch) but *not* the init, so scratch, Genesis and
SAR are fine-tuned on exactly the same patches and compared pairwise.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sar3d.data.tasks import fold_cases, load_case, read_manifest
from sar3d.finetuning.model import build_segmenter, predict_logits
from sar3d.paths import ratio_tag
from sar3d.pretraining.registry import SCRATCH
from sar3d.seeding import derive_seed, numpy_rng
from sar3d.training import checkpoints, devices, loop, metering, stopping

log = logging.getLogger(__name__)


def labelled_cases(
    config: dict[str, Any], task: str, fold: int, ratio: float, train: list[str], val: list[str]
) -> tuple[list[str], list[str]]:
    """The label-ratio subsets of a fold's training and validation cases.

    Each is nested across ratios (one seeded order per (task, fold) and part) and
    holds at least one case, so a ratio-r run touches at most ``ceil(r * N) + 1`` of
    the fold's N annotated cases; ``label_ratio_validation: full`` keeps every
    validation case instead.
    """
    from sar3d.data.splits import nested_label_subsets

    seed = config["seed"]
    train_r = nested_label_subsets(train, [ratio], numpy_rng(seed, "label_subsets", task, fold))[ratio]
    if not val or config["finetune"]["label_ratio_validation"] == "full":
        return train_r, sorted(val)
    val_r = nested_label_subsets(val, [ratio], numpy_rng(seed, "label_subsets", task, fold, "val"))[ratio]
    return train_r, val_r


def make_patch_dataset(config: dict[str, Any], items: list[dict[str, Any]]) -> Any:
    """In-memory cache of padded volumes and foreground indices; a random patch per ``__getitem__``."""
    from monai.data import CacheDataset
    from monai.transforms import Compose, FgBgToIndicesd, RandCropByPosNegLabeld, SpatialPadd

    fcfg = config["finetune"]
    patch = tuple(fcfg["patch_size"])
    ratio = fcfg["foreground_ratio"]
    transform = Compose([
        SpatialPadd(keys=["image", "label", "fg"], spatial_size=patch),
        FgBgToIndicesd(keys="fg"),
        RandCropByPosNegLabeld(
            keys=["image", "label"], label_key="fg", spatial_size=patch, pos=ratio, neg=1.0 - ratio,
            num_samples=1, fg_indices_key="fg_fg_indices", bg_indices_key="fg_bg_indices",
        ),
    ])
    data = [
        {"case": it["case"], "image": it["image"], "label": it["label"], "fg": it["label"].max(axis=0, keepdims=True)}
        for it in items
    ]
    return CacheDataset(data, transform=transform, cache_rate=1.0, num_workers=0, progress=False, copy_cache=False)


def epoch_batches(n_cases: int, batch_size: int, steps: int, rng: np.random.Generator) -> list[list[int]]:
    """Case indices of every step: successive seeded permutations, so each case is seen equally often."""
    need = batch_size * steps
    order: list[int] = []
    while len(order) < need:
        order.extend(int(i) for i in rng.permutation(n_cases))
    return [order[s * batch_size : (s + 1) * batch_size] for s in range(steps)]


def collate(samples: list[dict[str, Any]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.stack([torch.as_tensor(s["image"]).as_subclass(torch.Tensor) for s in samples]).float()
    labels = torch.stack([torch.as_tensor(s["label"]).as_subclass(torch.Tensor) for s in samples]).float()
    if device.type == "cuda":  # pragma: no cover - needs a GPU
        images, labels = images.pin_memory(), labels.pin_memory()
    return devices.to_device(images, device), devices.to_device(labels, device)


OUTPUT_LAYER = "out_tr."


def init_model(
    config: dict[str, Any], task: str, init: str, fold: int, pretrained: Path | None
) -> tuple[torch.nn.Module, list[str]]:
    """Seeded segmentation U-Net, with pre-trained weights transferred unless ``scratch``."""
    from sar3d.nets.weights import load_state_dict_file, transfer_weights

    torch.manual_seed(derive_seed(config["seed"], "finetune", task, fold, "init"))
    model = build_segmenter(config, task)
    skipped: list[str] = []
    if init != SCRATCH:
        if pretrained is None:
            raise ValueError(f"init '{init}' needs --pretrained weights")
        # The restoration head maps features to intensities; a segmentation head starts
        # fresh (nnU-Net transfers likewise) unless the config asks to reuse it.
        exclude = () if config["finetune"]["transfer_output_layer"] else (OUTPUT_LAYER,)
        skipped = list(transfer_weights(model, load_state_dict_file(pretrained), exclude=exclude))
        log.info("transferred %s; kept random init for %s", pretrained, skipped or "nothing")
    return model, skipped


def run_finetune(
    config: dict[str, Any], task: str, init: str, ratio: float, fold: int, split: Path, data: Path,
    pretrained: Path | None, out: Path, checkpoint: Path,
) -> None:
    """Fine-tune one (task, init, ratio, fold); write the best weights and the full checkpoint."""
    from monai.losses import DiceLoss

    from sar3d.tracking import tracked_run

    fcfg = config["finetune"]
    seed = config["seed"]
    device = devices.resolve_device(fcfg["device"])
    devices.set_determinism(device)
    amp = devices.resolve_precision(fcfg["precision"], device)
    classes = config["tasks"][task]["classes"]
    manifest = read_manifest(data)
    train_all, val_all = fold_cases(split, manifest, "train"), fold_cases(split, manifest, "val")
    train, val = labelled_cases(config, task, fold, ratio, train_all, val_all)
    log.info("%s fold %d ratio %s: %d/%d training cases, %d/%d val", task, fold, ratio, len(train), len(train_all),
             len(val), len(val_all))

    train_items = [load_case(data, manifest[c], classes) for c in train]
    val_items = [load_case(data, manifest[c], classes) for c in val]
    dataset = make_patch_dataset(config, train_items)

    model, skipped = init_model(config, task, init, fold, pretrained)
    model = devices.prepare_model(model, device, fcfg["memory_format"])
    optimizer = torch.optim.Adam(model.parameters(), lr=fcfg["lr"])
    optimizer.param_groups[0]["name"] = "unet"
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=fcfg["plateau"]["factor"], patience=fcfg["plateau"]["patience"]
    )
    scaler = devices.make_grad_scaler(device, amp)
    loss_fn = DiceLoss(sigmoid=True, batch=True)
    val_loss_fn = DiceLoss(sigmoid=True)
    stopper = stopping.EarlyStopping(fcfg["early_stopping_patience"])
    tag = ratio_tag(ratio)
    job = loop.Fit(
        models={"unet": model}, optimizers={"unet": optimizer}, schedulers={"unet": scheduler}, stopper=stopper,
        checkpoint=Path(checkpoint),
        fingerprint=checkpoints.fingerprint({
            "seed": seed, "task": task, "init": init, "ratio": tag, "fold": fold, "finetune": fcfg,
            "width": config["pretrain"]["width"], "train": train, "val": val,
        }),
        epochs=fcfg["epochs"], keep_best=("unet",), scaler=scaler,
    )

    def train_epoch(epoch: int) -> tuple[dict[str, float], dict[str, float]]:
        # identical data stream for every init: the seed leaves the init out
        dataset.transform.set_random_state(seed=derive_seed(seed, "finetune", task, tag, fold, "crop", epoch) % 2**32)
        rng = numpy_rng(seed, "finetune", task, tag, fold, "batches", epoch)
        meter = metering.EpochMeter()
        steps = epoch_batches(len(dataset), fcfg["batch_size"], fcfg["steps_per_epoch"], rng)
        for indices in metering.progress(steps, len(steps), f"{task} {init} f{fold} e{epoch}"):
            with meter.wait():
                x, y = collate([dataset[i][0] for i in indices], device)
            optimizer.zero_grad(set_to_none=True)
            with devices.autocast(device, amp):
                logits = model(x)
            loss = loss_fn(logits.float(), y)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            meter.update({"loss_dice": loss.detach()})
            meter.add_step(len(indices))
        return meter.means(), meter.timing("patches")

    def validate(epoch: int) -> tuple[dict[str, float], float]:
        from sar3d.metrics import dice_per_class

        meter = metering.EpochMeter()
        for item in (val_items or train_items):  # no val case: fall back to training volumes (logged)
            logits = predict_logits(model, item["image"], config, device, amp)
            ref = torch.as_tensor(item["label"])
            metrics = {"loss_dice": val_loss_fn(logits[None], ref[None])}
            for name, d in zip(classes, dice_per_class(torch.sigmoid(logits) > 0.5, ref > 0.5), strict=True):
                if d == d:  # NaN (both empty) stays out of the mean
                    metrics[f"dice_{name}"] = d
            meter.update(metrics)
        means = meter.means()
        return means, means["loss_dice"]

    identity = {"task": task, "init": init, "ratio": ratio, "fold": fold}
    with tracked_run(config, "finetune", identity) as run:
        run.tags({
            "device": str(device), "precision": str(amp or "fp32"), "pretrained": str(pretrained or ""),
            "n_train_cases": len(train), "n_val_cases": len(val), "train_cases": ",".join(train),
            "val_cases": ",".join(val), "label_ratio_validation": fcfg["label_ratio_validation"],
            "transfer_skipped": ",".join(skipped) if skipped else "-",
            "validation_on": "val" if val_items else "train (no val cases)",
        })
        state = loop.fit(job, train_epoch, validate, run)
        checkpoints.save_state_dict(Path(out), state.best_weights["unet"])
        run.metrics({**loop.final_metrics(state, stopper, fcfg["epochs"]), "final/n_transfer_skipped": len(skipped)})
        run.artifact(out)
