"""The live stack equals the batch weighted mean; rejection removes outliers, not signal."""

from __future__ import annotations

import numpy as np

from subwatch.stack import WeightedAccumulator


def test_live_stack_equals_batch_weighted_mean() -> None:
    rng = np.random.default_rng(0)
    shape = (64, 80)
    frames = [rng.normal(1000, 10 + i, shape).astype(np.float32) for i in range(12)]
    covs = []
    for i in range(12):
        cov = np.ones(shape, np.float32)
        cov[:, : i % 5] = 0.0  # some subs miss the left edge
        covs.append(cov)
    weights = [1.0 / (10 + i) ** 2 for i in range(12)]
    acc = WeightedAccumulator(shape, kappa=None)
    for f, c, w in zip(frames, covs, weights, strict=True):
        acc.add(f, c, weight=w)
    num = sum(
        np.where(c >= 1, w * f.astype(np.float64), 0)
        for f, c, w in zip(frames, covs, weights, strict=True)
    )
    den = sum(np.where(c >= 1, w, 0.0) for c, w in zip(covs, weights, strict=True))
    batch = num / den
    np.testing.assert_allclose(acc.mean(), batch, rtol=1e-6)
    assert acc.coverage()[0, 0] == sum(1 for i in range(12) if i % 5 == 0)


def test_rejection_removes_a_trail_after_warmup() -> None:
    rng = np.random.default_rng(1)
    shape = (50, 50)
    acc = WeightedAccumulator(shape, kappa=3.0, warmup=5)
    ones = np.ones(shape, np.float32)
    clean = []
    for i in range(10):
        f = rng.normal(500, 5, shape).astype(np.float32)
        clean.append(f.copy())
        if i == 7:
            f[25, :] += 400  # a satellite trail
        result = acc.add(f, ones, noise=5.0)
        if i == 7:
            assert result.rejected_pixels >= 48
        elif i >= 5:
            assert result.rejected_pixels < 0.01 * f.size
    stack = acc.mean()
    expected = np.mean(clean, axis=0)
    assert np.abs(stack[25] - expected[25]).max() < 5.0


def test_colour_stacks_keep_three_planes() -> None:
    acc = WeightedAccumulator((20, 30, 3), kappa=None)
    img = np.zeros((20, 30, 3), np.float32)
    img[..., 0], img[..., 1], img[..., 2] = 1, 2, 3
    acc.add(img, np.ones((20, 30), np.float32))
    acc.add(img + 1, np.ones((20, 30), np.float32))
    np.testing.assert_allclose(acc.mean()[0, 0], [1.5, 2.5, 3.5])
