"""Validation on held-out synthetic scenes, at fixed depths, against the noiseless truth.

The scenes come from a seed the training never draws from (training uses ``[seed, iteration]``,
validation ``[VAL_SEED, depth, index]``), so they are new skies with new noise. Reported per
depth, for the noisy input and for the network:

Residual hot pixels are left out of every metric (they are defects, not noise; the network
is trained to remove them, which would otherwise dominate the squared errors).

* ``gat_mse``: mean squared error in GAT units (the noisy input is about 1 by construction);
  ``gat_gain_db`` = 10 log10(noisy / denoised);
* ``faint_gat_mse``: the same on pixels less than 3 sky sigmas above the sky (where noise
  hides the most);
* ``psnr_linear``: PSNR in linear ADU after the exact unbiased inverse, peak = 99.5th
  percentile of the truth above the sky, averaged in dB over scenes.
"""

from __future__ import annotations

import numpy as np
import torch

from subwatch.enhance.vst import inverse
from training.scenes import make_sample

VAL_SEED = 20260701
DEPTHS = (1, 4, 16, 64, 256, 500)


def _psnr(mse: float, peak: float) -> float:
    return float(10.0 * np.log10(peak * peak / max(mse, 1e-30)))


def validate(
    model: torch.nn.Module,
    per_depth: int = 8,
    size: int = 128,
    depths: tuple[int, ...] = DEPTHS,
    batch: int = 4,
) -> dict:
    """Scores of ``model`` per depth and overall (see the module docstring)."""
    model.eval()
    device = next(model.parameters()).device
    out: dict = {"per_depth": {}, "scenes_per_depth": per_depth, "size": size}
    all_gain = []
    for di, depth in enumerate(depths):
        samples = [
            make_sample(np.random.default_rng([VAL_SEED, di, i]), size, depth)
            for i in range(per_depth)
        ]
        preds = []
        with torch.no_grad():
            for k in range(0, per_depth, batch):
                x = torch.from_numpy(np.stack([s.inputs for s in samples[k : k + batch]]))
                preds.extend(model(x.to(device)).cpu().numpy()[:, 0])
        acc = {k: [] for k in ("n", "d", "fn", "fd", "pn", "pd")}
        for s, p in zip(samples, preds, strict=True):
            t, z = s.target[0], s.inputs[0]
            ok = ~s.defects
            faint = ok & (s.clean < s.true_model.offset + 3.0 * s.true_model.sigma)
            acc["n"].append(np.mean((z - t)[ok] ** 2))
            acc["d"].append(np.mean((p - t)[ok] ** 2))
            acc["fn"].append(np.mean((z - t)[faint] ** 2) if faint.any() else np.nan)
            acc["fd"].append(np.mean((p - t)[faint] ** 2) if faint.any() else np.nan)
            lin = inverse(p + s.centre, s.model).astype(np.float64)
            clean = s.clean.astype(np.float64)
            peak = float(np.percentile(clean, 99.5) - s.true_model.offset)
            peak = max(peak, 3.0 * s.true_model.sigma)
            acc["pn"].append(_psnr(np.mean((s.noisy - clean)[ok] ** 2), peak))
            acc["pd"].append(_psnr(np.mean((lin - clean)[ok] ** 2), peak))
        n, d = float(np.mean(acc["n"])), float(np.mean(acc["d"]))
        row = {
            "gat_mse_noisy": n,
            "gat_mse_denoised": d,
            "gat_gain_db": 10.0 * np.log10(n / d),
            "faint_gat_mse_noisy": float(np.nanmean(acc["fn"])),
            "faint_gat_mse_denoised": float(np.nanmean(acc["fd"])),
            "psnr_linear_noisy": float(np.mean(acc["pn"])),
            "psnr_linear_denoised": float(np.mean(acc["pd"])),
        }
        row["psnr_linear_gain_db"] = row["psnr_linear_denoised"] - row["psnr_linear_noisy"]
        out["per_depth"][str(depth)] = row
        all_gain.append(row["gat_gain_db"])
    out["mean_gat_gain_db"] = float(np.mean(all_gain))
    out["mean_psnr_linear_gain_db"] = float(
        np.mean([r["psnr_linear_gain_db"] for r in out["per_depth"].values()])
    )
    model.train()
    return out
