"""The live stack equals the batch weighted mean; rejection removes outliers, not signal."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from subwatch.stack import WeightedAccumulator
from subwatch.stack.kernels import welford_update


def _batch(frames, covs, weights) -> np.ndarray:
    num = sum(
        np.where(c >= 1, w * f.astype(np.float64), 0)
        for f, c, w in zip(frames, covs, weights, strict=True)
    )
    den = sum(np.where(c >= 1, w, 0.0) for c, w in zip(covs, weights, strict=True))
    return num / den


def test_live_stack_equals_batch_weighted_mean() -> None:
    rng = np.random.default_rng(0)
    shape = (64, 80)
    n = 600
    frames = [rng.normal(1000 + i % 7, 10 + i % 13, shape).astype(np.float32) for i in range(n)]
    covs = []
    for i in range(n):
        cov = np.ones(shape, np.float32)
        cov[:, : i % 5] = 0.0  # some subs miss the left edge
        covs.append(cov)
    weights = [1.0 / (10 + i % 13) ** 2 for i in range(n)]
    acc = WeightedAccumulator(shape, kappa=None)
    for f, c, w in zip(frames, covs, weights, strict=True):
        acc.add(f, c, weight=w)
    np.testing.assert_allclose(acc.mean(), _batch(frames, covs, weights), rtol=1e-5)
    assert acc.coverage()[0, 0] == sum(1 for i in range(n) if i % 5 == 0)


def test_state_is_at_most_four_float32_arrays() -> None:
    acc = WeightedAccumulator((100, 200), kappa=3.0, warmup=5)
    assert acc.state_bytes() <= 4 * 4 * 100 * 200


@pytest.mark.parametrize("trail_frame", [0, 2, 7])
def test_a_trail_in_any_frame_is_rejected(trail_frame: int) -> None:
    """Including the very first subs, which have no running statistics yet."""
    rng = np.random.default_rng(1)
    shape = (50, 60)
    acc = WeightedAccumulator(shape, kappa=3.0, warmup=5)
    ones = np.ones(shape, np.float32)
    clean = []
    rejected = {}
    for i in range(10):
        f = rng.normal(500, 5, shape).astype(np.float32)
        clean.append(f.copy())
        if i == trail_frame:
            f[25, :] += 400  # a satellite trail
        result = acc.add(f, ones, weight=1 / 25, noise=5.0)
        if result.warmup_rejected:
            rejected.update(enumerate(result.warmup_rejected))
        elif result.rejected_pixels is not None:
            rejected[i] = result.rejected_pixels
    assert rejected[trail_frame] >= shape[1]
    others = [v for k, v in rejected.items() if k != trail_frame]
    assert max(others) < 0.01 * shape[0] * shape[1]
    stack = acc.mean()
    expected = np.mean(clean, axis=0)
    noise = 5.0 / np.sqrt(10)
    assert np.abs(stack[25] - expected[25]).max() < 3 * noise
    assert abs(float(np.mean(stack[25] - expected[25]))) < 0.5 * noise


def test_the_warm_up_stack_is_readable() -> None:
    acc = WeightedAccumulator((10, 10), kappa=3.0, warmup=5)
    acc.add(np.full((10, 10), 4.0, np.float32), np.ones((10, 10), np.float32))
    acc.add(np.full((10, 10), 6.0, np.float32), np.ones((10, 10), np.float32))
    np.testing.assert_allclose(acc.mean(), 5.0)


def test_colour_stacks_keep_three_planes() -> None:
    acc = WeightedAccumulator((20, 30, 3), kappa=None)
    img = np.zeros((20, 30, 3), np.float32)
    img[..., 0], img[..., 1], img[..., 2] = 1, 2, 3
    acc.add(img, np.ones((20, 30), np.float32))
    acc.add(img + 1, np.ones((20, 30), np.float32))
    np.testing.assert_allclose(acc.mean()[0, 0], [1.5, 2.5, 3.5])


def test_colour_rejection_per_channel() -> None:
    rng = np.random.default_rng(3)
    acc = WeightedAccumulator((20, 30, 3), kappa=3.0, warmup=3)
    for i in range(6):
        img = rng.normal(100, 2, (20, 30, 3)).astype(np.float32)
        if i == 4:
            img[5, 5, 1] += 500
        result = acc.add(img, np.ones((20, 30), np.float32), noise=2.0)
    assert abs(acc.mean()[5, 5, 1] - 100) < 5
    assert result.rejected_pixels is not None


def test_updates_from_two_threads_at_once_are_serialised_and_exact() -> None:
    """The kernels' threading layer refuses concurrent launches (it would abort the process):
    two threads updating two stacks at the same time must both get the exact result."""
    rng = np.random.default_rng(8)
    subs = rng.normal(100.0, 5.0, (12, 64, 48)).astype(np.float32)
    covered = np.ones((64, 48), bool)
    results: list[np.ndarray] = []
    errors: list[BaseException] = []

    def stack() -> None:
        try:
            W, M, S = (np.zeros((64, 48), np.float32) for _ in range(3))
            for _ in range(20):
                W[:], M[:], S[:] = 0.0, 0.0, 0.0
                for sub in subs:
                    welford_update(sub, covered, W, M, S, weight=1.0)
            results.append(M.copy())
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=stack) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    expected = subs.astype(np.float64).mean(axis=0)
    for mean in results:
        np.testing.assert_allclose(mean, expected, rtol=1e-5)


def test_mono_rows_and_single_channel_rows_give_the_same_stack() -> None:
    """Mono stacks take the vectorised row loop, colour ones the per-pixel loop: one arithmetic."""
    rng = np.random.default_rng(21)
    shape = (97, 131)
    mono = [np.zeros(shape, np.float32) for _ in range(3)]
    colour = [np.zeros((*shape, 1), np.float32) for _ in range(3)]
    counts = [np.zeros(shape, np.uint16), np.zeros(shape, np.uint16)]
    for k in range(10):
        sub = rng.normal(500.0, 20.0, shape).astype(np.float32)
        sub[rng.integers(0, 97, 15), rng.integers(0, 131, 15)] += 3000.0
        covered = rng.random(shape) > 0.1
        options = dict(weight=0.5 + k / 10, scale=1.02, offset=-3.0, kappa=3.0, floor=400.0)
        a = welford_update(sub, covered, *mono, sky=500.0, count=counts[0], **options)
        b = welford_update(sub[:, :, None], covered, *colour, sky=500.0, count=counts[1], **options)
        assert a == b
        if k > 2:
            assert a[0] > 0  # rejection is exercised
    for m, c in zip(mono, colour, strict=True):
        np.testing.assert_array_equal(m, c[:, :, 0])
    np.testing.assert_array_equal(counts[0], counts[1])
