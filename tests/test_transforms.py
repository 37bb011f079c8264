"""Batched Models Genesis transforms: parameters honoured, distributions match a per-cube reference.

The reference functions below are plain numpy loops written from the public
Models Genesis ``generate_pair`` semantics; the batched tensor versions must
agree with them in distribution within the stated tolerances.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from sar3d.pretraining.transforms.genesis import (
    INPAINT,
    NO_PAINT,
    OUTPAINT,
    GenesisConfig,
    GenesisTransform,
    apply_lookup_table,
    bezier_lookup_tables,
    flip_parities,
    local_pixel_shuffle,
    nonlinear_intensity,
    paint,
    paint_masks,
    random_flip,
    shuffle_in_windows,
    shuffle_windows,
    uniform_noise,
)

CFG = GenesisConfig()
SMALL = (32, 32, 16)
SMALL_WINDOW = tuple(max(1, s // 10) for s in SMALL)  # the reference's dim // 10: (3, 3, 1)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def replay(g: torch.Generator) -> torch.Generator:
    """A generator in the same state, to re-draw what a function is about to draw."""
    other = torch.Generator()
    other.set_state(g.get_state())
    return other


# --------------------------------------------------------------------------- reference (numpy loops)


def ref_flip_parity(rng: np.random.Generator, rate: float) -> tuple[int, int, int]:
    parity, count = [0, 0, 0], 3
    while rng.random() < rate and count > 0:
        parity[rng.integers(3)] ^= 1
        count -= 1
    return tuple(parity)


def ref_shuffle(cube: np.ndarray, rng: np.random.Generator, n_windows: int, max_window: tuple) -> np.ndarray:
    out = cube.copy()
    for _ in range(n_windows):
        s = [int(rng.integers(1, m + 1)) for m in max_window]
        o = [int(rng.integers(0, d - w + 1)) for d, w in zip(cube.shape, s, strict=True)]
        sl = tuple(slice(a, a + w) for a, w in zip(o, s, strict=True))
        window = cube[sl].flatten()
        rng.shuffle(window)
        out[sl] = window.reshape(s)
    return out


def ref_curve_map(values: np.ndarray, rng: np.random.Generator, inverse_rate: float) -> np.ndarray:
    pts = np.array([[0, 0], [rng.random(), rng.random()], [rng.random(), rng.random()], [1, 1]])
    t = np.linspace(0, 1, 100_000)
    basis = np.stack([t**3, 3 * t**2 * (1 - t), 3 * t * (1 - t) ** 2, (1 - t) ** 3])  # reference ordering
    xs, ys = pts[:, 0] @ basis, pts[:, 1] @ basis
    if rng.random() < inverse_rate:
        xs = np.sort(xs)
    else:
        xs, ys = np.sort(xs), np.sort(ys)
    return np.interp(values, xs, ys)


def _randint(rng: np.random.Generator, lo: int, hi: int) -> int:
    return int(rng.integers(lo, hi + 1))


def ref_paint_mask(shape: tuple, rng: np.random.Generator, inpaint: bool) -> np.ndarray:
    """Noise mask of the reference image_in_painting / image_out_painting."""
    mask = np.zeros(shape, bool)
    if inpaint:
        count = 5
        while count > 0 and rng.random() < 0.95:
            s = [_randint(rng, d // 6, d // 3) for d in shape]
            o = [_randint(rng, 3, d - w - 3) for d, w in zip(shape, s, strict=True)]
            mask[tuple(slice(a, a + w) for a, w in zip(o, s, strict=True))] = True
            count -= 1
        return mask
    mask[:] = True
    count = 5
    first = True
    while count > 0 and (first or rng.random() < 0.95):
        first = False
        s = [d - _randint(rng, 3 * d // 7, 4 * d // 7) for d in shape]
        o = [_randint(rng, 3, d - w - 3) for d, w in zip(shape, s, strict=True)]
        mask[tuple(slice(a, a + w) for a, w in zip(o, s, strict=True))] = False
        count -= 1
    return mask


# --------------------------------------------------------------------------- config


def test_config_fields_are_the_config_keys() -> None:
    root = Path(__file__).resolve().parents[1]
    section = yaml.safe_load((root / "config.yaml").read_text())["pretrain"]["transforms"]
    schema = yaml.safe_load((root / "src/sar3d/resources/config.schema.yaml").read_text())
    schema_keys = schema["properties"]["pretrain"]["properties"]["transforms"]["properties"]
    fields = {f.name for f in dataclasses.fields(GenesisConfig)}
    assert fields == set(section) == set(schema_keys)
    cfg = GenesisConfig.from_config(section)
    assert cfg.local_shuffle_max_window == (6, 6, 3)
    assert GenesisConfig.from_config({}) == GenesisConfig()
    for key, spec in schema_keys.items():  # schema defaults are the dataclass defaults
        default = spec.get("default")
        assert default is None or getattr(GenesisConfig(), key) == (tuple(default) if isinstance(default, list)
                                                                     else default)
    with pytest.raises(ValueError, match="unknown"):
        GenesisConfig.from_config({"flip_prob": 0.3})
    with pytest.raises(ValueError, match="flip_rate"):
        GenesisConfig(flip_rate=1.5)


# --------------------------------------------------------------------------- flip


def test_flip_frequencies_match_reference() -> None:
    n, rate = 20000, 0.4
    ours = flip_parities(n, gen(1), rate, "cpu").numpy().astype(int)
    rng = np.random.default_rng(1)
    ref = np.array([ref_flip_parity(rng, rate) for _ in range(n)])
    # exact: P(no flip drawn) = 0.6, so P(all parities even) >= 0.6
    assert (ours.sum(1) == 0).mean() == pytest.approx((ref.sum(1) == 0).mean(), abs=0.015)
    assert ours.mean(0) == pytest.approx(ref.mean(0), abs=0.015)
    assert ours.mean(0) == pytest.approx([ours.mean()] * 3, abs=0.015)  # axes symmetric
    assert flip_parities(1000, gen(2), 0.0, "cpu").sum() == 0
    # rate 1: exactly three flips, so the number of flipped axes is odd
    assert (flip_parities(1000, gen(2), 1.0, "cpu").sum(1) % 2 == 1).all()


def test_flip_applies_the_drawn_parities() -> None:
    cubes = torch.rand(64, 1, 8, 6, 4, generator=gen(3))
    g = gen(4)
    parity = flip_parities(64, replay(g), 0.7, "cpu")
    out = random_flip(cubes, g, dataclasses.replace(CFG, flip_rate=0.7))
    for i in range(64):
        dims = [a + 1 for a in range(3) if parity[i, a]]
        assert torch.equal(out[i], cubes[i].flip(dims) if dims else cubes[i])


# --------------------------------------------------------------------------- local pixel shuffling


def test_window_sizes_respect_the_maximum_and_scale() -> None:
    for shape, maxw in ((SMALL, SMALL_WINDOW), ((64, 64, 32), (6, 6, 3)), ((8, 8, 2), (6, 6, 3))):
        origins, sizes = shuffle_windows(4, shape, gen(5), 5000, maxw, "cpu")
        dims = torch.tensor(shape)
        cap = torch.minimum(torch.tensor(maxw), dims)
        assert (sizes >= 1).all() and (sizes <= cap).all()
        assert (sizes.reshape(-1, 3).amax(0) == cap).all()  # every size up to the cap is drawn
        assert (origins >= 0).all() and (origins + sizes <= dims).all()


def test_one_window_permutes_its_own_voxels_only() -> None:
    cubes = torch.rand(50, 1, *SMALL, generator=gen(6))
    origins, sizes = shuffle_windows(50, SMALL, gen(7), 1, (6, 6, 3), "cpu")
    out = shuffle_in_windows(cubes, origins, sizes, gen(8))
    moved = 0
    for i in range(50):
        (ox, oy, oz), (sx, sy, sz) = origins[i, 0].tolist(), sizes[i, 0].tolist()
        inside = torch.zeros(SMALL, dtype=torch.bool)
        inside[ox:ox + sx, oy:oy + sy, oz:oz + sz] = True
        assert torch.equal(out[i, 0][~inside], cubes[i, 0][~inside])
        assert torch.equal(out[i, 0][inside].sort().values, cubes[i, 0][inside].sort().values)
        moved += int((out[i, 0] != cubes[i, 0]).sum())
    assert moved > 0


def test_windows_read_the_original_and_later_windows_win() -> None:
    cube = torch.arange(8 * 8 * 4, dtype=torch.float32).reshape(1, 1, 8, 8, 4)
    origins = torch.tensor([[[0, 0, 0], [2, 2, 0]]])
    sizes = torch.tensor([[[4, 4, 4], [4, 4, 4]]])
    for seed in range(5):
        out = shuffle_in_windows(cube, origins, sizes, gen(seed))[0, 0]
        first, second = cube[0, 0, 0:4, 0:4, :], cube[0, 0, 2:6, 2:6, :]
        assert torch.equal(out[2:6, 2:6, :].flatten().sort().values, second.flatten().sort().values)
        only_first = torch.ones(4, 4, 4, dtype=torch.bool)
        only_first[2:, 2:, :] = False
        assert set(out[0:4, 0:4, :][only_first].tolist()) <= set(first.flatten().tolist())
        rest = torch.ones(8, 8, 4, dtype=torch.bool)
        rest[0:4, 0:4], rest[2:6, 2:6] = False, False
        assert torch.equal(out[rest], cube[0, 0][rest])


def test_shuffle_rate_and_changes_stay_inside_windows() -> None:
    cubes = torch.rand(1000, 1, 8, 8, 4, generator=gen(9))
    cfg = dataclasses.replace(CFG, local_shuffle_windows=20, local_shuffle_max_window=(3, 3, 2))
    out = local_pixel_shuffle(cubes, gen(10), cfg)
    changed = (out != cubes).flatten(1).any(1).float().mean()
    assert float(changed) == pytest.approx(0.5, abs=0.05)  # 20 windows: P(no change | shuffled) ~ 0
    # with windows known, nothing outside their union moves
    origins, sizes = shuffle_windows(20, SMALL, gen(11), 30, SMALL_WINDOW, "cpu")
    big = torch.rand(20, 1, *SMALL, generator=gen(12))
    moved = shuffle_in_windows(big, origins, sizes, gen(13)) != big
    for i in range(20):
        union = torch.zeros(SMALL, dtype=torch.bool)
        for (ox, oy, oz), (sx, sy, sz) in zip(origins[i].tolist(), sizes[i].tolist(), strict=True):
            union[ox:ox + sx, oy:oy + sy, oz:oz + sz] = True
        assert not moved[i, 0][~union].any()


def test_shuffled_fraction_matches_reference() -> None:
    """Fraction of voxels whose value changes, 32x32x16 cubes with the reference window scaling.

    Ours is drawn in 10 calls of 20 cubes: windows of one call share its
    permutation bank, which makes one call's mean fraction vary more than
    independent windows would (by ~2% for these small windows); over calls the
    mean is the reference's.
    """
    n_windows, n_calls, n_per_call, n_ref = 1000, 10, 20, 60
    g = gen(15)
    fractions = []
    for _ in range(n_calls):
        cubes = torch.rand(n_per_call, 1, *SMALL, generator=g)
        origins, sizes = shuffle_windows(n_per_call, SMALL, g, n_windows, SMALL_WINDOW, "cpu")
        fractions.append((shuffle_in_windows(cubes, origins, sizes, g) != cubes).float().mean().item())
    ours = float(np.mean(fractions))
    rng = np.random.default_rng(17)
    ref = np.mean([
        (ref_shuffle(c, rng, n_windows, SMALL_WINDOW) != c).mean()
        for c in rng.random((n_ref, *SMALL), dtype=np.float32)
    ])
    assert 0.1 < ref < 0.9
    assert ours == pytest.approx(ref, rel=0.03)


def test_default_window_count_at_full_size() -> None:
    cube = torch.rand(1, 1, 64, 64, 32, generator=gen(18))
    origins, sizes = shuffle_windows(1, (64, 64, 32), gen(19), 10000, (6, 6, 3), "cpu")
    changed = (shuffle_in_windows(cube, origins, sizes, gen(20)) != cube).float().mean().item()
    rng = np.random.default_rng(21)
    c = rng.random((64, 64, 32), dtype=np.float32)
    ref = (ref_shuffle(c, rng, 10000, (6, 6, 3)) != c).mean()
    assert changed == pytest.approx(ref, abs=0.02)


def _window_permutations(cubes: torch.Tensor, generator: torch.Generator) -> list[tuple[int, ...]]:
    """Shuffle voxels 0..2 (a 3x1x1 window at the origin) of each 4x1x1 cube; return each cube's order."""
    origins = torch.zeros((cubes.shape[0], 1, 3), dtype=torch.long)
    sizes = torch.tensor([3, 1, 1]).expand(cubes.shape[0], 1, 3)
    out = shuffle_in_windows(cubes, origins, sizes, generator)
    assert torch.equal(out[:, 0, 3], cubes[:, 0, 3])  # outside the window
    return [tuple(int(v) for v in row) for row in out[:, 0, :3, 0, 0]]


def test_each_window_permutation_is_uniform_and_windows_are_not_all_alike() -> None:
    """The permutation bank: marginally uniform over calls, and varied within one call."""
    cube = torch.arange(4, dtype=torch.float32).reshape(1, 1, 4, 1, 1)
    g = gen(40)
    counts: dict[tuple[int, ...], int] = {}
    for _ in range(600):  # one window per call: its permutation is a fresh bank draw every time
        perm = _window_permutations(cube, g)[0]
        counts[perm] = counts.get(perm, 0) + 1
    assert set(counts) == {(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)}
    expected = 600 / 6
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 20.5  # 5 degrees of freedom: P(chi2 > 20.5) ~ 0.001
    within = _window_permutations(cube.repeat(300, 1, 1, 1, 1), gen(41))  # 300 windows, one call
    assert len(set(within)) == 6


def test_uniform_noise_is_uniform_on_the_16_bit_grid() -> None:
    noise = uniform_noise((64, 1, 16, 16, 8), gen(42), "cpu")
    assert noise.shape == (64, 1, 16, 16, 8) and noise.dtype == torch.float32
    assert float(noise.min()) >= 0.0 and float(noise.max()) < 1.0
    steps = noise * 65536
    assert torch.equal(steps, steps.round())
    hist = torch.histc(noise, bins=16, min=0.0, max=1.0) / noise.numel()
    assert torch.allclose(hist, torch.full((16,), 1 / 16), atol=0.003)
    assert not torch.equal(noise, uniform_noise((64, 1, 16, 16, 8), gen(43), "cpu"))
    assert uniform_noise((3, 5), gen(42), "cpu", torch.float64).dtype == torch.float64


# --------------------------------------------------------------------------- non-linear intensity


def test_curve_is_monotone_onto_unit_interval() -> None:
    ramp = torch.linspace(0, 1, 16 * 16 * 8).reshape(1, 1, 16, 16, 8).repeat(400, 1, 1, 1, 1)
    out = nonlinear_intensity(ramp, gen(22), CFG).flatten(1)
    diffs = out.diff(dim=1)
    increasing = (diffs >= -1e-6).all(1)
    decreasing = (diffs <= 1e-6).all(1)
    assert bool((increasing | decreasing).all())
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    untouched = (out == ramp.flatten(1)).all(1)
    inverted = decreasing & ~increasing
    assert float(untouched.float().mean()) == pytest.approx(0.1, abs=0.05)
    assert float(inverted.float().mean() / (~untouched).float().mean()) == pytest.approx(0.5, abs=0.08)
    ends = out[:, [0, -1]]
    assert torch.allclose(ends[~inverted], torch.tensor([0.0, 1.0]).expand_as(ends[~inverted]), atol=1e-6)
    assert torch.allclose(ends[inverted], torch.tensor([1.0, 0.0]).expand_as(ends[inverted]), atol=1e-6)


def test_lookup_table_matches_np_interp_on_the_same_curve() -> None:
    g = gen(23)
    ctrl = torch.rand((32, 4), generator=replay(g)).double().numpy()  # the first draw: x1, y1, x2, y2
    lut, inverted = bezier_lookup_tables(32, g, 0.5, "cpu")
    values = np.random.default_rng(24).random(5000)
    mapped = apply_lookup_table(torch.from_numpy(values).float().reshape(1, 1, 5000, 1, 1).repeat(32, 1, 1, 1, 1),
                                lut).reshape(32, -1).double().numpy()
    t = np.linspace(0, 1, 100_000)
    basis = np.stack([3 * (1 - t) ** 2 * t, 3 * (1 - t) * t**2, t**3])
    for i in range(32):
        xs = np.sort(ctrl[i, 0] * basis[0] + ctrl[i, 2] * basis[1] + basis[2])
        ys = np.sort(ctrl[i, 1] * basis[0] + ctrl[i, 3] * basis[1] + basis[2])
        expected = np.interp(values, xs, ys[::-1] if inverted[i] else ys)
        assert np.abs(mapped[i] - expected).max() < 2e-3


def test_intensity_histogram_matches_reference() -> None:
    n = 1500
    ramp = np.linspace(0, 1, 1024)
    cubes = torch.from_numpy(ramp).float().reshape(1, 1, 16, 16, 4).repeat(n, 1, 1, 1, 1)
    always = dataclasses.replace(CFG, nonlinear_rate=1.0)
    ours = nonlinear_intensity(cubes, gen(25), always).numpy().ravel()
    rng = np.random.default_rng(26)
    ref = np.concatenate([ref_curve_map(ramp, rng, 0.5) for _ in range(n)])
    bins = np.linspace(0, 1, 11)
    h_ours = np.histogram(ours, bins)[0] / ours.size
    h_ref = np.histogram(ref, bins)[0] / ref.size
    assert np.abs(h_ours - h_ref).max() < 0.015


# --------------------------------------------------------------------------- painting


def test_paint_kinds_and_border_rule() -> None:
    n = 2000
    mask, kind = paint_masks(n, SMALL, gen(27), CFG, "cpu")
    painted = kind != NO_PAINT
    assert float(painted.float().mean()) == pytest.approx(0.9, abs=0.025)
    assert float((kind == INPAINT).sum() / painted.sum()) == pytest.approx(0.2, abs=0.03)
    shell = torch.ones(SMALL, dtype=torch.bool)
    shell[3:-3, 3:-3, 3:-3] = False
    assert not mask[kind == NO_PAINT].any()
    assert not mask[kind == INPAINT][:, shell].any()  # in-painting boxes keep 3 voxels from the border
    assert mask[kind == OUTPAINT][:, shell].all()  # out-painting noise always covers the border
    assert mask[kind == INPAINT].flatten(1).any(1).float().mean() > 0.9  # >= 1 box with prob 0.95


def test_painted_volume_matches_reference() -> None:
    n = 1500
    mask, kind = paint_masks(n, SMALL, gen(28), dataclasses.replace(CFG, paint_rate=1.0), "cpu")
    frac = mask.flatten(1).float().mean(1)
    rng = np.random.default_rng(29)
    ref_in = np.mean([ref_paint_mask(SMALL, rng, True).mean() for _ in range(600)])
    ref_out = np.mean([ref_paint_mask(SMALL, rng, False).mean() for _ in range(600)])
    assert float(frac[kind == INPAINT].mean()) == pytest.approx(ref_in, rel=0.12)
    assert float(frac[kind == OUTPAINT].mean()) == pytest.approx(ref_out, rel=0.03)


def test_paint_replaces_exactly_the_mask_with_noise() -> None:
    cubes = torch.full((40, 1, *SMALL), 2.0)
    g = gen(30)
    mask, _ = paint_masks(40, SMALL, replay(g), CFG, "cpu")
    out = paint(cubes, g, CFG)
    assert torch.equal(out[:, 0] != 2.0, mask)
    noise = out[:, 0][mask]
    assert float(noise.min()) >= 0.0 and float(noise.max()) < 1.0
    assert float(noise.mean()) == pytest.approx(0.5, abs=0.01)


# --------------------------------------------------------------------------- pipeline


def test_pipeline_target_is_the_flipped_original_and_is_deterministic() -> None:
    cubes = torch.rand(16, 1, *SMALL, generator=gen(31))
    transform = GenesisTransform(dataclasses.replace(CFG, flip_rate=0.8))
    g = gen(32)
    parity = flip_parities(16, replay(g), 0.8, "cpu")
    x, y = transform(cubes, g)
    assert x.shape == y.shape == cubes.shape and x.dtype == y.dtype == cubes.dtype
    for i in range(16):
        dims = [a + 1 for a in range(3) if parity[i, a]]
        assert torch.equal(y[i], cubes[i].flip(dims) if dims else cubes[i])
    assert not torch.equal(x, y)
    x2, y2 = transform(cubes, gen(32))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = transform(cubes, gen(33))
    assert not torch.equal(x, x3)
    assert not torch.equal(cubes, x) and torch.equal(cubes, torch.rand(16, 1, *SMALL, generator=gen(31)))


def test_pipeline_keeps_dtype_and_checks_the_generator() -> None:
    cubes = torch.rand(4, 1, 16, 16, 8, dtype=torch.float64, generator=gen(34))
    x, y = GenesisTransform(CFG)(cubes, gen(35))
    assert x.dtype == y.dtype == torch.float64
    with pytest.raises(ValueError, match="B, C, X, Y, Z"):
        GenesisTransform(CFG)(cubes[0], gen(35))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_shapes_and_is_deterministic() -> None:
    cubes = torch.rand(8, 1, 64, 64, 32, device="cuda")
    g1 = torch.Generator(device="cuda").manual_seed(5)
    g2 = torch.Generator(device="cuda").manual_seed(5)
    x1, y1 = GenesisTransform(CFG)(cubes, g1)
    x2, y2 = GenesisTransform(CFG)(cubes, g2)
    assert x1.device.type == "cuda" and torch.equal(x1, x2) and torch.equal(y1, y2)
