"""The method seam changed no number: every built-in method reproduces the fixture recorded before it (to rounding).

``golden.json`` was written by ``golden.py`` on the code before the seam (see
there). A difference names the block, the epoch and the term that moved.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from golden import BLOCKS, FIXTURE, generate

REL = 1e-5  # float rounding of another CPU's kernels moves a term by < 1e-6 relative (golden.py)


def _moved(want: dict, have: dict) -> dict:
    """Terms of ``want`` that ``have`` does not reproduce to a relative :data:`REL`."""
    return {k: (want[k], have[k]) for k in want if not math.isclose(want[k], have[k], rel_tol=REL, abs_tol=1e-9)}


def _moved_weights(want: dict, have: dict) -> list[str]:
    """Tensors whose sum or absolute sum moved by more than :data:`REL` of the absolute sum."""
    return sorted(k for k, (total, size) in want.items()
                  if abs(have[k][0] - total) > REL * size or not math.isclose(have[k][1], size, rel_tol=REL))


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the fixture was recorded on one thread; reductions must add up alike
    try:
        return generate(tmp_path_factory.mktemp("golden"))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_reproduces_the_recorded_run(recorded: dict, name: str) -> None:
    expected = json.loads(Path(FIXTURE).read_text())[name]
    got = recorded[name]
    assert len(got["history"]) == len(expected["history"])
    for epoch, (want, have) in enumerate(zip(expected["history"], got["history"], strict=True)):
        assert set(have) == set(want), f"{name} epoch {epoch}: terms {sorted(set(have) ^ set(want))} differ"
        moved = _moved(want, have)
        assert not moved, f"{name} epoch {epoch}: {moved}"
    assert set(got["weights"]) == set(expected["weights"]), f"{name}: exported tensors differ"
    moved = _moved_weights(expected["weights"], got["weights"])
    assert not moved, f"{name}: exported weights differ in {moved}"
