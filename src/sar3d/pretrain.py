"""Self-supervised pre-training: SAR and its ablations through one code path.

Every method is the SAR objective (paper eq. 4) with some terms switched off:

=========  ===========  ===========  ===================  =========================
method     restoration  scale (SA)   adversarial (MIAL)   cubes
=========  ===========  ===========  ===================  =========================
genesis    yes          -            -                    all scales (Models Genesis)
sa         yes          yes          -                    all scales (+SA)
mial       yes          -            yes                  all scales (+MIAL)
sar        yes          yes          yes                  all scales
sar_s2     yes          -            yes                  1/2 only (Table 3)
sar_s4     yes          -            yes                  1/4 only
sar_s8     yes          -            yes                  1/8 only
=========  ===========  ===========  ===================  =========================

The single-scale variants keep everything of SAR except the scale loss: with
one scale there is one class, cross-entropy is identically zero and the scale
head would learn nothing, so it is not built.

One training step is the two-player game of eq. (3)-(4):

1. *Discriminator step.* The encoder's four feature maps, detached, go through
   the MIAL discriminator M; ``L_disc = BCE-with-logits(M(E(x_a)), modality)``
   (positive = MRI) updates M only (SGD or Adam, fixed lr 1e-3).
2. *Generator step.* ``w_res·L_res + w_scale·L_scale + w_adv·L_adv_enc`` updates
   the U-Net and the scale head (SGD), where ``L_res = MSE(U-Net(x̂), x)``,
   ``L_scale = CE(S(E(x_a)_deepest), scale)`` and
   ``L_adv_enc = BCE-with-logits(M(E(x_a)), 1 - modality)``: the encoder is
   trained to make M call CT "MRI" and MRI "CT". This flipped-label form is the
   usual non-saturating replacement for minimising ``-L_disc`` (GANs, ADDA): it
   has the same fixed point (M at chance) but does not vanish when M is
   confident, which is exactly when the encoder needs a gradient. M's weights
   are frozen during this step, so only the encoder learns from it.

``x_a``, what the auxiliary heads see, is the clean cube x by default
(``pretrain.aux_view: clean``) and the corrupted x̂ with ``corrupted`` (the
paper's wording): out-painting noise hides scale and modality (docs/deviations.md).

Model selection: the U-Net's ``ReduceLROnPlateau``, early stopping and the best
checkpoint follow the validation ``objective`` = ``w_res·L_res + w_scale·L_scale``,
the self-supervised objective without the adversarial term (for Genesis: the
weighted restoration alone), so GAN dynamics never choose the checkpoint. The
adversarial terms, M's accuracy and the encoder's confusion are logged apart
every epoch. Validation batches and their corruption come from a generator
re-seeded each epoch (the same inputs every epoch) and are normalised with
their own batch statistics (:func:`sar3d.networks.batch_statistics`). ``out``
receives the U-Net weights of the best validation epoch.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sar3d import engine
from sar3d.seeding import derive_seed

log = logging.getLogger(__name__)

# single-scale ablations: the fraction of the volume side their cubes are cut at
SINGLE_SCALE_FRACTION = {"s2": 0.5, "s4": 0.25, "s8": 0.125}


@dataclass(frozen=True)
class MethodSpec:
    """Which terms of the SAR objective a method trains, and on which cube scales."""

    name: str
    scale_loss: bool
    adversarial: bool
    scales: tuple[float, ...] | None = None  # fractions of the volume side; None = every scale in the shards


METHODS: dict[str, MethodSpec] = {
    "genesis": MethodSpec("genesis", scale_loss=False, adversarial=False),
    "sa": MethodSpec("sa", scale_loss=True, adversarial=False),
    "mial": MethodSpec("mial", scale_loss=False, adversarial=True),
    "sar": MethodSpec("sar", scale_loss=True, adversarial=True),
    **{
        f"sar_{tag}": MethodSpec(f"sar_{tag}", scale_loss=False, adversarial=True, scales=(fraction,))
        for tag, fraction in SINGLE_SCALE_FRACTION.items()
    },
}


def method_spec(method: str) -> MethodSpec:
    try:
        return METHODS[method]
    except KeyError:
        raise ValueError(f"unknown pre-training method {method!r} (known: {', '.join(METHODS)})") from None


@dataclass
class PretrainModels:
    unet: nn.Module
    scale_head: nn.Module | None
    discriminator: nn.Module | None

    def as_dict(self) -> dict[str, nn.Module]:
        out = {"unet": self.unet, "scale_head": self.scale_head, "discriminator": self.discriminator}
        return {k: v for k, v in out.items() if v is not None}


def build_models(config: dict[str, Any], spec: MethodSpec, device: torch.device) -> PretrainModels:
    """U-Net and the heads the method needs, initialised from seeds.

    The U-Net's initial weights depend on the study seed only (not the method),
    so ablations differ in their objective, not in their starting point.
    """
    from sar3d.networks import ModalityDiscriminator, ScaleHead, UNet3D

    seed = config["seed"]
    torch.manual_seed(derive_seed(seed, "pretrain", "init", "unet"))
    unet = UNet3D(in_channels=1, out_channels=1, width=config["pretrain"]["width"], final_activation="sigmoid")
    channels = list(unet.encoder_channels)
    head = disc = None
    if spec.scale_loss:
        torch.manual_seed(derive_seed(seed, "pretrain", "init", "scale_head"))
        head = ScaleHead(channels[-1], n_classes=3)
    if spec.adversarial:
        torch.manual_seed(derive_seed(seed, "pretrain", "init", "discriminator"))
        disc = ModalityDiscriminator(channels)
    models = PretrainModels(unet, head, disc)
    for name, module in models.as_dict().items():
        setattr(models, name, engine.prepare_model(module, device))
    return models


def build_optimizers(config: dict[str, Any], models: PretrainModels) -> dict[str, torch.optim.Optimizer]:
    """SGD with momentum: U-Net and scale head together (one generator step); the discriminator apart.

    The discriminator uses SGD (the paper) or Adam (``pretrain.optimizer.discriminator``).
    """
    opt_cfg = config["pretrain"]["optimizer"]
    lr, momentum = opt_cfg["lr"], opt_cfg["momentum"]
    groups = [{"params": list(models.unet.parameters()), "lr": lr["unet"], "name": "unet"}]
    if models.scale_head is not None:
        groups.append({"params": list(models.scale_head.parameters()), "lr": lr["scale_head"], "name": "scale_head"})
    optimizers = {"main": torch.optim.SGD(groups, lr=lr["unet"], momentum=momentum)}
    if models.discriminator is not None:
        params = list(models.discriminator.parameters())
        group = [{"params": params, "lr": lr["discriminator"], "name": "discriminator"}]
        if opt_cfg["discriminator"] == "adam":
            optimizers["discriminator"] = torch.optim.Adam(group, lr=lr["discriminator"])
        else:
            optimizers["discriminator"] = torch.optim.SGD(group, lr=lr["discriminator"], momentum=momentum)
    return optimizers


class GeneratorNet(nn.Module):
    """U-Net and scale head as one module whose ``forward`` returns all a step needs.

    Why: ``DistributedDataParallel`` only synchronises gradients of what runs
    through the wrapped module's ``forward``, and a step needs the encoder
    features, the restoration and the scale logits at once.
    """

    def __init__(self, unet: nn.Module, scale_head: nn.Module | None) -> None:
        super().__init__()
        self.unet = unet
        self.scale_head = scale_head

    def forward(
        self, x_hat: torch.Tensor, x_aux: torch.Tensor | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor | None]:
        """Restoration of ``x_hat``; the auxiliary heads' features come from ``x_aux`` when given.

        Returns ``(auxiliary features, restoration, scale logits)``: the features
        the scale head and the discriminator see (those of ``x_aux``, else of ``x_hat``).
        """
        feats = self.unet.encode(x_hat)
        aux = feats if x_aux is None else self.unet.encode(x_aux)
        logits = self.scale_head(aux[-1]) if self.scale_head is not None else None
        return aux, self.unet.decode(feats), logits


@dataclass
class StepContext:
    """What a step needs besides the batch: the method, loss weights, device and precision.

    ``generator_net``/``discriminator_net`` are the (possibly DDP-wrapped) modules
    a step calls; None builds them from the models (a single process).
    """

    spec: MethodSpec
    weights: dict[str, float]
    device: torch.device
    amp: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    generator_net: nn.Module | None = None
    discriminator_net: nn.Module | None = None
    aux_view: str = "clean"  # what the scale head and discriminator see: "clean" x or "corrupted" x̂

    def nets(self, models: PretrainModels) -> tuple[nn.Module, nn.Module | None]:
        gen = self.generator_net or GeneratorNet(models.unet, models.scale_head)
        return gen, self.discriminator_net or models.discriminator

    def aux_input(self, models: PretrainModels, target: torch.Tensor) -> torch.Tensor | None:
        """The clean cube for the auxiliary heads, or None when they see the corrupted input (or don't exist)."""
        has_aux = models.scale_head is not None or models.discriminator is not None
        return target if has_aux and self.aux_view == "clean" else None


def _disc_terms(
    disc: nn.Module, feats: list[torch.Tensor], modality: torch.Tensor, flip: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """BCE-with-logits of the discriminator against the modality (``flip``: against the other modality)."""
    logits = disc(feats).float().reshape(-1)
    target = modality.float()
    return F.binary_cross_entropy_with_logits(logits, 1.0 - target if flip else target), logits


def generator_losses(
    models: PretrainModels, ctx: StepContext, feats: list[torch.Tensor], out: torch.Tensor,
    scale_logits: torch.Tensor | None, target: torch.Tensor, scale: torch.Tensor, modality: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted generator objective and its terms (detached) from one :class:`GeneratorNet` output.

    The discriminator term calls the bare discriminator: its weights are frozen
    in this step, so only the encoder gets (and DDP only syncs) gradients.
    """
    w = ctx.weights
    terms: dict[str, torch.Tensor] = {"loss_res": F.mse_loss(out.float(), target.float())}
    objective = w["restoration"] * terms["loss_res"]
    if scale_logits is not None:
        logits = scale_logits.float()
        terms["loss_scale"] = F.cross_entropy(logits, scale)
        terms["acc_scale"] = (logits.argmax(dim=1) == scale).float().mean()
        objective = objective + w["scale"] * terms["loss_scale"]
    total = objective
    if models.discriminator is not None:
        terms["loss_adv_enc"], logits_m = _disc_terms(models.discriminator, feats, modality, flip=True)
        # the encoder's confusion: how often M calls a cube's modality wrong
        terms["confusion"] = ((logits_m.detach() > 0).long() != modality).float().mean()
        total = total + w["adversarial"] * terms["loss_adv_enc"]
    terms["objective"] = objective
    terms["loss_total"] = total
    return total, {k: v.detach() for k, v in terms.items()}


def train_step(
    models: PretrainModels, optimizers: dict[str, torch.optim.Optimizer], ctx: StepContext,
    x_hat: torch.Tensor, target: torch.Tensor, scale: torch.Tensor, modality: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """One round of the two-player game (discriminator step, then generator step).

    Returns the terms as detached 0-d tensors on the device: converting each to a
    float here would synchronise with the GPU every step.
    """
    scaler = ctx.scaler or torch.amp.GradScaler(ctx.device.type, enabled=False)
    gen_net, disc_net = ctx.nets(models)
    metrics: dict[str, torch.Tensor] = {}
    with engine.autocast(ctx.device, ctx.amp):
        feats, out, scale_logits = gen_net(x_hat, ctx.aux_input(models, target))
    disc = models.discriminator
    if disc is not None and disc_net is not None:
        opt = optimizers["discriminator"]
        opt.zero_grad(set_to_none=True)
        with engine.autocast(ctx.device, ctx.amp):
            loss_disc, logits = _disc_terms(disc_net, [f.detach() for f in feats], modality, flip=False)
        scaler.scale(loss_disc).backward()
        scaler.step(opt)
        metrics["loss_disc"] = loss_disc.detach()
        metrics["acc_disc"] = ((logits.detach() > 0).long() == modality).float().mean()
        disc.requires_grad_(False)  # the generator step must not move M
    try:
        opt = optimizers["main"]
        opt.zero_grad(set_to_none=True)
        with engine.autocast(ctx.device, ctx.amp):
            total, terms = generator_losses(models, ctx, feats, out, scale_logits, target, scale, modality)
        scaler.scale(total).backward()
        scaler.step(opt)
        scaler.update()
    finally:
        if disc is not None:
            disc.requires_grad_(True)
    metrics.update(terms)
    return metrics


@torch.no_grad()
def eval_step(
    models: PretrainModels, ctx: StepContext,
    x_hat: torch.Tensor, target: torch.Tensor, scale: torch.Tensor, modality: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Every term of :func:`train_step` without updating anything."""
    with engine.autocast(ctx.device, ctx.amp):
        feats, out, scale_logits = GeneratorNet(models.unet, models.scale_head)(x_hat, ctx.aux_input(models, target))
        _, terms = generator_losses(models, ctx, feats, out, scale_logits, target, scale, modality)
        metrics = dict(terms)
        if models.discriminator is not None:
            loss_disc, logits = _disc_terms(models.discriminator, feats, modality, flip=False)
            metrics["loss_disc"] = loss_disc
            metrics["acc_disc"] = ((logits > 0).long() == modality).float().mean()
    return {k: v.detach() for k, v in metrics.items()}


def corrupt_batch(
    transform: Any, batch: dict[str, torch.Tensor], generator: torch.Generator, device: torch.device
) -> tuple[torch.Tensor, ...]:
    """Non-blocking copy to the device, then the batched Models Genesis corruption there (seeded).

    A batch the loader already corrupted (``x_hat`` present) is only copied.
    """
    if "x_hat" in batch:
        x_hat, target = batch["x_hat"], batch["target"]
    else:
        x_hat, target = transform(engine.to_device(batch["cube"], device, volume=False), generator)
    return (
        engine.to_device(x_hat, device),
        engine.to_device(target, device),
        engine.to_device(batch["scale"].long(), device, volume=False),
        engine.to_device(batch["modality"].long(), device, volume=False),
    )


def resolve_transform_device(name: str, device: torch.device) -> torch.device:
    """Where the corruption runs: ``auto`` follows the training device; ``cuda`` needs a CUDA run."""
    if name == "auto":
        return torch.device(device.type)
    if name == "cuda" and device.type != "cuda":
        raise ValueError("pretrain.transform_device 'cuda' needs pretrain.device on CUDA")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"unknown pretrain.transform_device {name!r} (auto | cpu | cuda)")
    return torch.device(name)


def batch_stream(
    store: Any, transform: Any, batch_size: int, epoch: int, steps: int, *, batch_seed: int, corrupt_seed: int,
    device: torch.device, in_loader: bool, num_workers: int = 0, pin_memory: bool = False,
    dist: engine.Distributed | None = None,
) -> Iterator[tuple[torch.Tensor, ...]]:
    """One epoch's training tensors on the device for this rank, each batch corrupted with its own generator.

    ``in_loader``: corrupted on the CPU where the batch is read (DataLoader
    workers when ``num_workers > 0``); otherwise on ``device`` after the copy.
    """
    from sar3d.loader import batch_generator, make_pretrain_loader

    dist = dist or engine.Distributed()
    loader = make_pretrain_loader(
        store, batch_size, batch_seed, epoch, steps, num_workers=num_workers, pin_memory=pin_memory,
        rank=dist.rank, world_size=dist.world_size, corrupt=transform if in_loader else None,
        corrupt_seed=corrupt_seed,
    )
    for step, batch in enumerate(loader):
        generator = None
        if not in_loader:
            generator = batch_generator(corrupt_seed, epoch, step * dist.world_size + dist.rank, device)
        yield corrupt_batch(transform, batch, generator, device)


def train_steps(
    models: PretrainModels, optimizers: dict[str, torch.optim.Optimizer], ctx: StepContext,
    stream: Iterator[tuple[torch.Tensor, ...]], steps: int, desc: str = "",
) -> engine.EpochMeter:
    """``steps`` training steps from ``stream``, timing the wait for each batch apart from the step."""
    meter = engine.EpochMeter()
    for _ in engine.progress(range(steps), steps, desc):
        with meter.wait():
            tensors = next(stream)
        meter.update(train_step(models, optimizers, ctx, *tensors))
        meter.add_step(int(tensors[0].shape[0]))
    return meter


class _NullRun:
    """Stands in for the MLflow run on ranks other than 0, which log nothing."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def run_pretrain(config: dict[str, Any], method: str, cube_dirs: list[Path], out: Path, checkpoint: Path) -> None:
    """Pre-train one method on the cube shards; write the best U-Net state dict and the full checkpoint."""
    from sar3d.cubes import scale_index
    from sar3d.loader import open_cube_store
    from sar3d.networks import batch_statistics, count_parameters
    from sar3d.tracking import tracked_run
    from sar3d.transforms import GenesisConfig, GenesisTransform

    spec = method_spec(method)
    pcfg = config["pretrain"]
    seed = config["seed"]
    engine.set_determinism()
    dist = engine.Distributed.from_env()
    device = engine.init_distributed(dist, engine.resolve_device(pcfg["device"]))
    if device.type == "cpu":
        engine.keep_freed_memory()
    in_loader = resolve_transform_device(pcfg.get("transform_device", "auto"), device).type == "cpu"
    amp = engine.resolve_precision(pcfg["precision"], device)
    scales = None
    if spec.scales is not None:  # labels are positions in cubes.scales, never hard-coded
        scales = [scale_index(config["cubes"]["scales"], fraction) for fraction in spec.scales]
    dirs = [Path(d) for d in cube_dirs]
    train_store = open_cube_store(dirs, "train", scales)
    val_store = open_cube_store(dirs, "val", scales)
    validation_on = "val"
    if len(val_store) == 0:  # too few cases for a val split: score on fixed train batches instead
        log.warning("no validation cubes in %s; validating on fixed training batches", [str(d) for d in dirs])
        val_store, validation_on = train_store, "train (no val cubes)"
    transform = GenesisTransform(GenesisConfig.from_config(pcfg["transforms"]))
    pin = engine.pin_memory_default(device)

    models = build_models(config, spec, device)
    optimizers = build_optimizers(config, models)
    # the U-Net and scale head follow the plateau of the objective; the discriminator keeps its lr
    schedulers = {
        "main": torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizers["main"], mode="min", factor=pcfg["plateau"]["factor"], patience=pcfg["plateau"]["patience"]
        )
    }
    scaler = engine.make_grad_scaler(device, amp)
    ctx = StepContext(
        spec, dict(pcfg["loss_weights"]), device, amp, scaler, aux_view=pcfg["aux_view"],
        generator_net=engine.wrap_ddp(GeneratorNet(models.unet, models.scale_head), dist, device),
        discriminator_net=(engine.wrap_ddp(models.discriminator, dist, device)
                           if models.discriminator is not None else None),
    )
    stopper = engine.EarlyStopping(pcfg["early_stopping_patience"])
    job = engine.Fit(
        models=models.as_dict(), optimizers=optimizers, schedulers=schedulers, stopper=stopper,
        checkpoint=Path(checkpoint),
        fingerprint=engine.fingerprint(
            {"seed": seed, "method": method, "pretrain": pcfg, "cubes": sorted(d.name for d in dirs)}
        ),
        epochs=pcfg["epochs"], keep_best=("unet",), scaler=scaler, is_main=dist.is_main,
    )

    def batches(split: str, epoch: int, steps: int, workers: int) -> Iterator[tuple[torch.Tensor, ...]]:
        key = method if split == "train" else "val"
        return batch_stream(
            train_store if split == "train" else val_store, transform, pcfg["batch_size"], epoch, steps,
            batch_seed=derive_seed(seed, "pretrain", key, "batches"),
            corrupt_seed=derive_seed(seed, "pretrain", key, "corrupt"),
            device=device, in_loader=in_loader, num_workers=workers, pin_memory=pin, dist=dist,
        )

    def train_epoch(epoch: int) -> tuple[dict[str, float], dict[str, float]]:
        meter = train_steps(models, optimizers, ctx, batches("train", epoch, pcfg["steps_per_epoch"],
                                                             pcfg["num_workers"]),
                            pcfg["steps_per_epoch"], f"{method} {epoch}")
        engine.sync_buffers(models.as_dict().values(), dist)
        return meter.means(), meter.timing("cubes")

    def validate(epoch: int) -> tuple[dict[str, float], float]:
        meter = engine.EpochMeter()
        with batch_statistics(*models.as_dict().values()):
            for tensors in batches("val", 0, pcfg["val_steps"], 0):  # the same inputs every epoch
                meter.update(eval_step(models, ctx, *tensors))
        metrics = meter.means()
        return metrics, metrics["objective"]

    identity = {"method": method}
    tracked = tracked_run(config, "pretrain", identity) if dist.is_main else contextlib.nullcontext(_NullRun())
    try:
        with tracked as run:
            run.tags({
                "device": str(device), "precision": str(amp or "fp32"), "world_size": dist.world_size,
                "transform_device": "loader (cpu)" if in_loader else str(device),
                "n_train_cubes": len(train_store), "validation_on": validation_on,
                **{f"parameters_{k}": count_parameters(m) for k, m in models.as_dict().items()},
            })
            state = engine.fit(job, train_epoch, validate, run)
            if dist.is_main:
                engine.save_state_dict(Path(out), state.best_weights["unet"])
                run.metrics(engine.final_metrics(state, stopper, pcfg["epochs"]))
                run.artifact(out)
    finally:
        if dist.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
