"""Satellite trails and cosmic rays leave nothing in the stack, even in the first subs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from astropy.io import fits

from subwatch.config import Config
from subwatch.service.daemon import run_daemon
from subwatch.simulate import SimOptions, simulate_session

DEFECTS = {1: ["trail"], 2: ["cosmic_rays"], 6: ["trail"], 7: ["cosmic_rays"]}


def _line_pixels(d: dict, m: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Stack pixels along a trail given in its sub's coordinates."""
    n = 2000
    t = np.linspace(0, 1, n)
    x = d["x0"] + t * (d["x1"] - d["x0"])
    y = d["y0"] + t * (d["y1"] - d["y0"])
    xr = m[0, 0] * x + m[0, 1] * y + m[0, 2]
    yr = m[1, 0] * x + m[1, 1] * y + m[1, 2]
    h, w = shape
    ok = (xr > 8) & (xr < w - 9) & (yr > 8) & (yr < h - 9)
    return np.round(yr[ok]).astype(int), np.round(xr[ok]).astype(int)


def _local_sigma(residual: np.ndarray, x: int, y: int, half: int = 10) -> float:
    """Robust scatter of the residual around (x, y), the 5x5 centre left out."""
    y0, x0 = max(y - half, 0), max(x - half, 0)
    win = residual[y0 : y + half + 1, x0 : x + half + 1].copy()
    win[y - y0 - 2 : y - y0 + 3, x - x0 - 2 : x - x0 + 3] = np.nan
    vals = win[np.isfinite(win)]
    return float(1.4826 * np.median(np.abs(vals - np.median(vals))))


def test_trails_and_cosmic_rays_leave_no_residual(tmp_path: Path) -> None:
    capture = tmp_path / "capture"
    truth = simulate_session(
        SimOptions(out=capture, lights=10, width=480, height=360, seed=8, defects=DEFECTS)
    )
    out = tmp_path / "out"
    cfg = Config.model_validate({"watch": {"path": str(capture)}, "output": {"path": str(out)}})
    run_daemon(cfg, once=True)
    rows = [json.loads(x) for x in (out / "frames.jsonl").read_text().splitlines()]
    lights = [r for r in rows if r["kind"] == "light"]
    assert all(r["status"] == "stacked" for r in lights)
    stack = fits.getdata(out / lights[0]["target"] / lights[0]["filter"] / "stack.fits").astype(
        float
    )
    model = fits.getdata(capture / truth["truth_sky"]).astype(float) / truth["gain"]
    residual = stack - model
    residual -= np.median(residual)
    core = residual[40:-40, 40:-40]
    sigma = 1.4826 * np.median(np.abs(core - np.median(core)))
    by_file = {r["file"]: r for r in lights}
    for light in truth["lights"]:
        for d in light["defects"]:
            m = np.array(light["transform"])
            if d["type"] == "trail":
                ys, xs = _line_pixels(d, m, stack.shape)
                assert ys.size > 100
                assert abs(float(np.mean(residual[ys, xs]))) < 0.5 * sigma, light["file"]
            elif d["type"] == "cosmic_rays":
                pts = np.array(d["positions"], float)
                xr = m[0, 0] * pts[:, 0] + m[0, 1] * pts[:, 1] + m[0, 2]
                yr = m[1, 0] * pts[:, 0] + m[1, 1] * pts[:, 1] + m[1, 2]
                inside = (xr > 8) & (xr < stack.shape[1] - 9) & (yr > 8) & (yr < stack.shape[0] - 9)
                for x, y in zip(
                    np.round(xr[inside]).astype(int), np.round(yr[inside]).astype(int), strict=True
                ):
                    # judged against the noise around the hit: some land on bright nebula,
                    # where photon noise is well above the sky's
                    local = _local_sigma(residual, x, y)
                    assert abs(residual[y, x]) < 4 * max(local, sigma), (light["file"], x, y)
    # the trail sub inside the warm-up had its trail counted when the buffer was integrated
    warm = next(r for r in lights if r.get("warmup_rejected_pixels"))
    assert warm["warmup_rejected_pixels"][truth["lights"][1]["file"]] > 200
    assert by_file[truth["lights"][6]["file"]]["rejected_pixels"] > 200
