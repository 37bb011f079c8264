"""Write ``golden.json``: what every built-in method computes in a short pre-training, at a fixed seed.

Why: the method seam must move Genesis, +SA, +MIAL, SAR and the single-scale
variants without changing a single number. The fixture was generated on the
code before the move (commit 5a5305c, with that commit's API: ``run_pretrain(config,
method, cube_dirs, out, checkpoint)`` and the method names of its fixed table) and
``test_golden.py`` asserts that the current code reproduces it: every logged
per-epoch term (train and validation), every learning rate, and per-tensor sums
and absolute sums of the exported weights, to a relative 1e-5.

Why a tolerance: float reductions round differently on another CPU's kernels
(an AMD EPYC CI machine moved the terms by up to 4.6e-7 relative against the
machine that recorded them), so bit-exactness tested the hardware, not the code;
any real change of the computation moves them by orders of magnitude more. The
histories are still those recorded on 5a5305c; the weights were a sha256 digest
there, reproduced bit-exactly in CI up to commit d81a359, and are per-tensor
statistics since, recorded by the code of 039dd91 (the computation of d81a359).

Run ``python tests/pretraining/golden.py`` only to regenerate on purpose (the
diff of the JSON then shows which numbers moved).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from cubeshards import BLOCKS as METHOD_BLOCKS  # noqa: E402
from cubeshards import DEMO_HEAD_LR, PAPER_DISCRIMINATOR, cube_folder, make_config  # noqa: E402
from sar3d.pretraining.base import PretrainJob  # noqa: E402
from sar3d.pretraining.run import run_pretrain  # noqa: E402

FIXTURE = Path(__file__).with_name("golden.json")
BLOCKS: dict[str, dict[str, Any]] = {
    **METHOD_BLOCKS,
    # one non-default setting per code path a default run does not take
    "sar_corrupted_view": {"kind": "sar", "aux_view": "corrupted", **DEMO_HEAD_LR, **PAPER_DISCRIMINATOR},
}
# the fixture's key of each block: the variant was recorded as method "sar" (its seeds follow the name)
RECORDED_AS = {"sar_corrupted_view": "sar"}


def weights_stats(state: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Per tensor: the float64 sum and sum of absolute values (rounding-tolerant, unlike a digest of the bytes)."""
    stats = {}
    for key in sorted(state):
        tensor = state[key].detach().cpu().double()
        stats[key] = [float(tensor.sum()), float(tensor.abs().sum())]
    return stats


def record(root: Path, dirs: list[Path], name: str) -> dict[str, Any]:
    """One short run of block ``name``: the checkpoint's history (minus timings) and the export's digest."""
    method = RECORDED_AS.get(name, name)
    # recorded in the default (contiguous) layout of 5a5305c; channels-last differs in float rounding
    config = make_config(root, results=f"results_{name}", methods={method: BLOCKS[name]},
                         memory_format="contiguous")
    out, ckpt = root / name / "model.pt", root / name / "checkpoint.pt"
    run_pretrain(config, PretrainJob(method, tuple(dirs), out, ckpt))
    history = torch.load(ckpt, weights_only=True)["history"]
    epochs = [{k: v for k, v in epoch.items() if not k.startswith("perf/")} for epoch in history]
    return {"history": epochs, "weights": weights_stats(torch.load(out, weights_only=True))}


def generate(root: Path) -> dict[str, Any]:
    """Every block of :data:`BLOCKS` on the two phantom cube shards of cubeshards.py."""
    dirs = [cube_folder(root / "ct", "ct", 0, 32, 1), cube_folder(root / "mri", "mri", 1, 32, 2)]
    return {name: record(root, dirs, name) for name in BLOCKS}


if __name__ == "__main__":
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        FIXTURE.write_text(json.dumps(generate(Path(tmp)), indent=1, sort_keys=True) + "\n")
    print(f"wrote {FIXTURE}")
