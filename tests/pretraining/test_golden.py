"""The method seam changed no number: every built-in method reproduces the fixture recorded before it.

``golden.json`` was written by ``golden.py`` on the code before the seam (see
there). A difference names the block, the epoch and the term that moved.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from golden import BLOCKS, FIXTURE, generate


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
        moved = {k: (want[k], have[k]) for k in want if have[k] != want[k]}
        assert not moved, f"{name} epoch {epoch}: {moved}"
    assert got["weights"] == expected["weights"], f"{name}: exported weights differ"
