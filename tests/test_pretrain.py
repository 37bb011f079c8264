"""SAR pre-training: every term learns, every method runs, outputs load, runs repeat and resume exactly."""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import torch

from cubeshards import BLOCKS, WIDTH, cube_folder, make_config
from sar3d.config import ConfigError
from sar3d.data.loader import make_pretrain_loader, open_cube_store
from sar3d.data.scales import scale_index
from sar3d.nets.unet import UNet3D
from sar3d.pretraining import registry
from sar3d.pretraining.base import PretrainJob, PretrainMethod
from sar3d.pretraining.run import Trainer, run_pretrain
from sar3d.pretraining.streams import move_batch
from sar3d.seeding import torch_generator
from sar3d.training import checkpoints, devices, distributed, loop, stopping

STEPS = 12


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Cube folders of both modalities and one MLflow store for the whole module (a store costs seconds)."""
    root = tmp_path_factory.mktemp("pretrain")
    dirs = [cube_folder(root / "ct", "ct", 0, 32, 1), cube_folder(root / "mri", "mri", 1, 32, 2)]
    return {"root": root, "dirs": dirs}


def _build(config: dict[str, Any], name: str = "sar") -> PretrainMethod:
    return registry.build(config, name, torch.device("cpu"))


def _fixed_batch(method: PretrainMethod, dirs: list[Path]) -> dict[str, Any]:
    store = open_cube_store(dirs, "train", method.cube_scales())
    batch = next(iter(make_pretrain_loader(store, 8, 0, 0, 1)))
    return move_batch(method.make_views(batch, torch_generator(0, "test")), torch.device("cpu"))


def _fixed_batch_history(config: dict[str, Any], dirs: list[Path], weights: dict[str, float]) -> list[dict]:
    config["pretrain"]["methods"]["sar"]["loss_weights"] = weights
    method = _build(config)
    batch = _fixed_batch(method, dirs)
    assert set(batch["modality"].tolist()) == {0, 1} and set(batch["scale"].tolist()) == {0, 1, 2}
    trainer = Trainer.single(method)
    return [{k: float(v) for k, v in trainer.train_step(batch).items()} for _ in range(STEPS)]


def _start_end(history: list[dict[str, float]], term: str) -> tuple[float, float]:
    """The term as step 0 computes it (before any update) and its mean over the last 4 steps (8-11)."""
    return history[0][term], float(np.mean([h[term] for h in history[-4:]]))


def test_every_sar_term_learns_on_a_fixed_batch(shared):
    """Train-mode losses of the SAR step on one fixed corrupted batch (8 cubes, both modalities, all scales).

    With the config's learning rates and the paper's weights (1/1/10), 12 steps
    of the full game: restoration MSE, scale CE, the encoder's adversarial BCE
    (against flipped modality labels: the encoder learns to fool M) and the
    weighted total all fall from their step-0 value to their mean over steps
    8-11. In that game M's own BCE rises - the encoder is winning - so M's
    learning is measured apart below. (Beyond ~15 steps the paper's lr 1.0 makes
    the scale CE on 8 memorised cubes spike once it nears 0, so the window is
    kept before that.)
    """
    config = make_config(shared["root"])
    history = _fixed_batch_history(config, shared["dirs"], dict(config["pretrain"]["methods"]["sar"]["loss_weights"]))
    for term in ["loss_res", "loss_scale", "loss_adv_enc", "loss_total"]:
        start, end = _start_end(history, term)
        assert end < start, f"{term}: {start:.4f} -> {end:.4f}"
    for h in history:
        assert {"loss_res", "loss_scale", "loss_adv_enc", "loss_disc", "acc_scale", "acc_disc"} <= set(h)


def test_discriminator_learns_on_fixed_features(shared):
    """M's BCE (its own step, config lr 1e-3) on a fixed batch, with every generator weight 0.

    The generator step then has zero gradient, so the encoder features are fixed
    and the discriminator step alone must lower its loss, every step.
    """
    config = make_config(shared["root"])
    history = _fixed_batch_history(config, shared["dirs"], {"adversarial": 0.0, "scale": 0.0, "restoration": 0.0})
    losses = [h["loss_disc"] for h in history]
    assert all(b < a for a, b in itertools.pairwise(losses)), losses
    start, end = _start_end(history, "loss_disc")
    assert end < start - 0.01


def test_method_blocks_build_the_paper_s_heads(shared):
    """Each block of the paper's methods builds exactly the heads its terms need, on its scales."""
    config = make_config(shared["root"])
    heads = {name: set(_build(config, name).heads) for name in BLOCKS}
    assert heads["genesis"] == set()
    assert heads["sa"] == {"scale_head"}
    assert heads["mial"] == {"discriminator"}
    assert heads["sar"] == {"scale_head", "discriminator"}
    assert config["pretrain"]["methods"]["sar"]["scales"] is None
    assert [config["pretrain"]["methods"][f"sar_s{k}"]["scales"] for k in (2, 4, 8)] == [[0.5], [0.25], [0.125]]
    scales = config["cubes"]["scales"]
    assert [_build(config, f"sar_s{k}").cube_scales() for k in (2, 4, 8)] == [
        [scale_index(scales, 1 / k)] for k in (2, 4, 8)
    ]
    with pytest.raises(ConfigError, match=re.escape("pretrain.methods.rot.kind")):
        make_config(shared["root"], methods={"rot": {"kind": "rotation-unknown"}})
    with pytest.raises(ConfigError, match=re.escape("pretrain.methods.sar_s2.scale_loss")):
        make_config(shared["root"], methods={"sar_s2": {"scale_loss": True}})


def test_early_stopping_and_precision_switch():
    stopper = stopping.EarlyStopping(patience=2)
    assert [stopper.step(s, e) for e, s in enumerate([1.0, 0.9, 0.95, math.nan, 0.5])] == [
        True, True, False, False, True
    ]
    assert stopper.best == 0.5 and stopper.best_epoch == 4 and not stopper.should_stop
    stopper.step(0.6, 5)
    stopper.step(0.6, 6)
    assert stopper.should_stop
    restored = stopping.EarlyStopping(patience=2)
    restored.load_state_dict(stopper.state_dict())
    assert restored.state_dict() == stopper.state_dict()
    cpu = torch.device("cpu")
    assert devices.resolve_precision("auto", cpu) is None  # CPU stays fp32 unless asked
    assert devices.resolve_precision("bf16", cpu) == torch.bfloat16
    assert devices.resolve_device("cpu") == cpu
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError):
            devices.resolve_device("cuda")
    assert not devices.make_grad_scaler(cpu, torch.float16).is_enabled()


def test_bf16_autocast_step_runs_on_cpu(shared):
    method = _build(make_config(shared["root"]))
    metrics = Trainer.single(method, amp=torch.bfloat16).train_step(_fixed_batch(method, shared["dirs"]))
    assert all(math.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("name", ["sa", "mial", "sar_s2", "sar_s4", "sar_s8"])
def test_each_ablation_runs_a_step(shared, name):
    config = make_config(shared["root"])
    block = config["pretrain"]["methods"][name]
    method = _build(config, name)
    assert ("scale_head" in method.heads) == block["scale_loss"]
    assert ("discriminator" in method.heads) == block["adversarial"]
    labels = method.cube_scales()
    store = open_cube_store(shared["dirs"], "train", labels)
    batch = next(iter(make_pretrain_loader(store, 4, 0, 0, 1)))
    if labels:
        assert set(batch["scale"].tolist()) == set(labels)
    views = move_batch(method.make_views(batch, torch_generator(0, name)), torch.device("cpu"))
    before = {k: v.clone() for k, v in method.unet.state_dict().items()}
    metrics = Trainer.single(method).train_step(views)
    assert ("loss_scale" in metrics) == block["scale_loss"] and ("loss_disc" in metrics) == block["adversarial"]
    assert all(math.isfinite(float(v)) for v in metrics.values())
    assert any(not torch.equal(before[k], v) for k, v in method.unet.state_dict().items())


def _run_metrics(config: dict[str, Any], method: str) -> dict[str, list[float]]:
    client = mlflow.MlflowClient(tracking_uri=config["tracking"]["uri"])
    exp = client.get_experiment_by_name(config["tracking"]["experiment"])
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.job_key = 'pretrain/method={method}'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    return {
        name: [m.value for m in sorted(client.get_metric_history(runs[0].info.run_id, name), key=lambda m: m.step)]
        for name in runs[0].data.metrics
    }


@pytest.mark.parametrize("method", ["sar", "genesis"])
def test_run_pretrain_writes_loadable_weights_and_per_epoch_metrics(shared, method, tmp_path):
    config = make_config(shared["root"], results=f"results_{method}")
    out, ckpt = tmp_path / "model.pt", tmp_path / "checkpoint.pt"
    run_pretrain(config, PretrainJob(method, tuple(shared["dirs"]), out, ckpt))
    state = torch.load(out, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    UNet3D(width=WIDTH).load_state_dict(state, strict=True)
    assert "down_tr64.ops.0.conv1.weight" in state and "out_tr.final_conv.weight" in state
    full = torch.load(ckpt, weights_only=True)
    assert full["finished"] and full["epoch"] == 2

    metrics = _run_metrics(config, method)
    terms = ["loss_res", "loss_total"]
    if method == "sar":
        terms += ["loss_scale", "loss_adv_enc", "loss_disc", "acc_scale", "acc_disc"]
    else:
        assert "train/loss_scale" not in metrics and "train/loss_disc" not in metrics
    for name in [f"{split}/{t}" for split in ("train", "val") for t in terms] + [
        "lr/unet", "perf/cubes_per_s", "perf/step_time_s", "perf/data_wait_fraction", "perf/epoch_time_s"
    ]:
        assert len(metrics[name]) == 2, name
    if method == "sar":
        assert len(metrics["lr/scale_head"]) == 2 and len(metrics["lr/discriminator"]) == 2
    assert "final/best_score" in metrics


def test_same_seed_same_weights_and_exact_resume(shared, tmp_path, monkeypatch):
    def pretrain(name: str, seed_shift: int = 0) -> dict[str, torch.Tensor]:
        config = make_config(shared["root"], results=name)
        config["seed"] += seed_shift
        out = tmp_path / name / "model.pt"
        run_pretrain(config, PretrainJob("sar", tuple(shared["dirs"]), out, tmp_path / name / "checkpoint.pt"))
        return torch.load(out, weights_only=True)

    first = pretrain("a")
    second = pretrain("b")
    assert all(torch.equal(first[k], second[k]) for k in first)
    other = pretrain("c", seed_shift=1)
    assert any(not torch.equal(first[k], other[k]) for k in first)

    # kill the job right after the first epoch's checkpoint, then rerun: it must resume and match
    real_save = checkpoints.save_checkpoint
    calls = {"n": 0}

    def save_then_die(*args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] > 1:
            raise KeyboardInterrupt("killed")
        real_save(*args, **kwargs)

    monkeypatch.setattr(checkpoints, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        pretrain("d")
    assert not (tmp_path / "d" / "model.pt").exists()
    assert torch.load(tmp_path / "d" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(checkpoints, "save_checkpoint", real_save)
    resumed = pretrain("d")
    assert all(torch.equal(first[k], resumed[k]) for k in first)


def test_distributed_settings_from_torchrun_env():
    single = distributed.Distributed.from_env({})
    assert (single.rank, single.world_size, single.enabled, single.is_main) == (0, 1, False, True)
    assert distributed.init_distributed(single, torch.device("cpu")) == torch.device("cpu")
    assert not torch.distributed.is_initialized()
    second = distributed.Distributed.from_env({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"})
    assert (second.local_rank, second.enabled, second.is_main) == (1, True, False)
    with pytest.raises(ValueError, match="RANK"):
        distributed.Distributed.from_env({"RANK": "2", "WORLD_SIZE": "2"})
    model = torch.nn.Linear(2, 1)
    assert distributed.wrap_ddp(model, single, torch.device("cpu")) is model


@pytest.mark.parametrize("is_main", [True, False])
def test_only_the_main_rank_checkpoints_and_logs(tmp_path, is_main):
    class Recorder:
        def __init__(self) -> None:
            self.steps: list[int] = []

        def metrics(self, values: dict[str, float], step: int) -> None:
            self.steps.append(step)

    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    job = loop.Fit(
        models={"unet": model}, optimizers={"main": opt},
        schedulers={"main": torch.optim.lr_scheduler.ReduceLROnPlateau(opt)}, stopper=stopping.EarlyStopping(5),
        checkpoint=tmp_path / "checkpoint.pt", fingerprint="f", epochs=2, is_main=is_main,
    )
    logger = Recorder()
    state = loop.fit(job, lambda epoch: ({"loss": 1.0}, {}), lambda epoch: ({"loss": 1.0}, 1.0 - epoch), logger)
    assert state.epoch == 2 and state.finished
    assert (tmp_path / "checkpoint.pt").exists() == is_main
    assert logger.steps == ([0, 1] if is_main else [])


def _ddp_rank(rank: int, world: int, port: int, root: Path, dirs: list[Path], out: Path) -> None:
    """One torchrun-like rank on CPU (gloo): two SAR steps on its own batches through DDP."""
    import os

    torch.set_num_threads(1)  # forked from a process that may have used OpenMP threads
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    dist = distributed.Distributed.from_env()
    device = distributed.init_distributed(dist, torch.device("cpu"))
    try:
        method = _build(make_config(root))
        trainer = Trainer(
            method, method.optimizers(), device, net=distributed.wrap_ddp(method.network(), dist, device),
            nets_apart={k: distributed.wrap_ddp(m, dist, device) for k, m in method.wrapped_apart().items()},
        )
        targets = []
        for batch in make_pretrain_loader(open_cube_store(dirs, "train"), 4, 0, 0, 2, rank=dist.rank,
                                          world_size=dist.world_size, views=method.make_views, views_seed=1):
            targets.append(batch["target"])
            trainer.train_step(move_batch(batch, device))
        distributed.sync_buffers(method.modules.values(), dist)  # as run_pretrain does after each epoch
        torch.save({"state": {k: v for m in method.modules.values() for k, v in m.state_dict().items()},
                    "targets": torch.stack(targets)}, out / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_ranks_train_in_lockstep_on_different_batches(shared, tmp_path):
    """DDP on CPU: after two steps on different cubes both ranks hold the same (updated) weights.

    Without gradient averaging the parameters would differ (different batches);
    without :func:`distributed.sync_buffers` the BatchNorm statistics would.
    """
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_ddp_rank, args=(2, port, shared["root"], shared["dirs"], tmp_path), nprocs=2,
                       start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert not torch.equal(ranks[0]["targets"], ranks[1]["targets"])  # each rank drew its own batches
    assert all(torch.equal(ranks[0]["state"][k], ranks[1]["state"][k]) for k in ranks[0]["state"])
    initial = _build(make_config(shared["root"])).unet.state_dict()
    assert any(not torch.equal(initial[k], ranks[0]["state"][k]) for k in initial)
