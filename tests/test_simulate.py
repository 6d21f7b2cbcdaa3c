"""The synthetic night must be what its truth file says it is.

Each test checks a number against the physics or the geometry the generator claims, with a
stated tolerance, so a regression in the renderer, the camera model or the bookkeeping fails.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import threading
import time
from datetime import datetime
from pathlib import Path

import cv2
import numpy as np
import pytest
from astropy.io import fits
from scipy import ndimage

from subwatch.simulate import SimOptions, add_arguments, run_cli, simulate_session
from subwatch.simulate.fitswrite import fits_bytes, header_length, write_chunked
from subwatch.simulate.night import (
    apply_affine,
    invert_affine,
    parse_defects,
    sprinkle_defects,
)
from subwatch.simulate.session import Simulation

W, H = 320, 240
MONO = dict(
    width=W,
    height=H,
    lights=6,
    seed=7,
    meridian_flip_at=4,
    defects={2: ["trail", "cosmic_rays"], 3: ["clouds"]},
    n_bias=4,
    n_darks=3,
    n_flats=3,
)


@pytest.fixture(scope="module")
def mono(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("mono")
    truth = simulate_session(SimOptions(out=out, **MONO))
    return out, truth


@pytest.fixture(scope="module")
def osc(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("osc")
    truth = simulate_session(
        SimOptions(
            out=out,
            width=W,
            height=H,
            lights=2,
            seed=5,
            osc=True,
            bayer="GBRG",
            n_bias=3,
            n_darks=1,
            n_flats=3,
        )
    )
    return out, truth


def _data(path: Path) -> np.ndarray:
    return fits.getdata(path).astype(np.float64)


def _master(out: Path, files: list[str]) -> np.ndarray:
    return np.mean([_data(out / f) for f in files], axis=0)


def _background(img: np.ndarray, box: int = 16) -> np.ndarray:
    """Median per box, smoothly enlarged: the sky under the stars, cheaply."""
    h, w = img.shape
    blocks = img[: h // box * box, : w // box * box].reshape(h // box, box, w // box, box)
    coarse = np.median(blocks, axis=(1, 3)).astype(np.float32)
    return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_LINEAR).astype(np.float64)


def _centroid(img: np.ndarray, x: float, y: float, sigma: float = 2.0) -> tuple[float, float]:
    """Iterated Gaussian-windowed centroid: unbiased for a symmetric star."""
    r = 9
    for _ in range(30):
        ix, iy = round(x), round(y)
        patch = img[iy - r : iy + r + 1, ix - r : ix + r + 1]
        yy, xx = np.mgrid[iy - r : iy + r + 1, ix - r : ix + r + 1]
        wgt = patch * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
        nx, ny = (wgt * xx).sum() / wgt.sum(), (wgt * yy).sum() / wgt.sum()
        if abs(nx - x) < 1e-6 and abs(ny - y) < 1e-6:
            break
        x, y = nx, ny
    return float(x), float(y)


def _good_stars(sim: Simulation, frames: list[int], n: int = 8, min_flux: float = 2e3) -> list[int]:
    """Bright, unsaturated, isolated stars, well inside the reference and the frames named."""
    st = sim.stars
    flux = st.rate * sim.opts.exptime
    picks = []
    for k in np.argsort(-flux):
        if not min_flux < flux[k] < 6e4:
            continue
        d = np.hypot(st.x - st.x[k], st.y - st.y[k])
        if np.any((d > 0) & (d < 14) & (flux > 0.005 * flux[k])):
            continue
        ok = True
        for i in [0, *frames]:
            fx, fy = apply_affine(invert_affine(sim.plans[i].matrix), st.x[k], st.y[k])
            ok &= bool(15 < fx < W - 16 and 15 < fy < H - 16)
        if ok:
            picks.append(int(k))
        if len(picks) == n:
            break
    return picks


# ----------------------------------------------------------------- determinism


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    kw = dict(width=96, height=64, lights=2, n_bias=1, n_darks=1, n_flats=1)
    a = simulate_session(SimOptions(out=tmp_path / "a", seed=3, **kw))
    b = simulate_session(SimOptions(out=tmp_path / "b", seed=3, **kw))
    c = simulate_session(SimOptions(out=tmp_path / "c", seed=4, **kw))
    assert a == b
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.fits"))
    assert len(files) == 6  # 2 lights, 1 bias, 1 dark, 1 flat, truth_sky
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    light = a["lights"][1]["file"]
    diff = np.abs(_data(tmp_path / "a" / light) - _data(tmp_path / "c" / light))
    assert diff.mean() > 5.0
    assert a["stars"] != c["stars"]
    assert a["lights"][1]["transform"] != c["lights"][1]["transform"]


# ----------------------------------------------------------------- geometry


def test_transforms_map_stars_onto_the_reference_noiseless() -> None:
    sim = Simulation(SimOptions(out=Path("unused"), **MONO))
    rotated = max((1, 2, 3), key=lambda i: abs(sim.plans[i].rotation_deg))
    flipped = 4
    assert abs(sim.plans[rotated].rotation_deg) > 0.05 and not sim.plans[rotated].flipped
    assert sim.plans[flipped].flipped and abs(abs(sim.plans[flipped].rotation_deg) - 180) < 0.5
    assert np.allclose(sim.plans[0].matrix, [[1, 0, 0], [0, 1, 0]])
    stars = _good_stars(sim, [rotated, flipped], min_flux=1e3)
    assert len(stars) >= 4
    parts = dict(nebula=False, glow=False, transients=False)
    ref = sim.light_signal(0, **parts)[0]
    for i in (rotated, flipped):
        img = sim.light_signal(i, **parts)[0]
        m = sim.plans[i].matrix
        for k in stars:
            sx, sy = float(sim.stars.x[k]), float(sim.stars.y[k])
            gx, gy = apply_affine(invert_affine(m), sx, sy)
            cx, cy = _centroid(img, gx, gy)
            rx, ry = apply_affine(m, cx, cy)
            assert math.hypot(rx - sx, ry - sy) < 0.01, (i, k)
            qx, qy = _centroid(ref, sx, sy)
            assert math.hypot(qx - rx, qy - ry) < 0.01, (i, k)
    # The nebula obeys the same matrices: frame i's pixel p shows the reference at M p.
    parts = dict(stars=False, glow=False, transients=False)
    ref = sim.light_signal(0, **parts)[0] / sim.plans[0].transparency
    for i in (rotated, flipped):
        img = sim.light_signal(i, **parts)[0] / sim.plans[i].transparency
        errs = []
        for shift in (0.0, 0.2):
            m = sim.plans[i].matrix.copy()
            m[0, 2] += shift
            pred = cv2.warpAffine(
                ref, m, (W, H), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderValue=np.nan
            )
            ok = np.isfinite(pred)
            ok[:12], ok[-12:], ok[:, :12], ok[:, -12:] = False, False, False, False
            errs.append(np.median(np.abs(pred - img)[ok]) / np.median(img[ok]))
        assert errs[0] < 1e-4 and errs[1] > 50 * errs[0], errs


def test_written_lights_are_their_model_plus_noise(mono: tuple[Path, dict]) -> None:
    """Every pixel of the written lights, stars included, is the simulator's noiseless
    model of that light (rendered with the truth transform) plus noise of the stated size.
    With the noiseless test above, this ties the files to the transforms: a star 0.1 px
    away from where the model puts it leaves residuals of many sigma."""
    out, truth = mono
    sim = Simulation(SimOptions(out=out, **MONO))
    gain, rn = truth["gain"], truth["read_noise_e"]
    bias = _master(out, truth["calibration"]["bias"])
    dark = _master(out, truth["calibration"]["darks"])
    mask = np.ones((H, W), bool)
    for x, y in truth["hot_pixels"]:
        mask[y, x] = False
    for i in (0, 1, 4, 5):
        assert np.allclose(sim.plans[i].matrix, truth["lights"][i]["transform"], atol=0)
        model = sim.light_expected(i)
        ok = mask & (model < 0.8 * truth["full_well"])
        resid = _data(out / truth["lights"][i]["file"]) - dark - model / gain
        var = model / gain**2 + (rn / gain) ** 2 * (1 + 1 / len(truth["calibration"]["darks"]))
        z = (resid / np.sqrt(var + 1 / 12))[ok]
        assert abs(np.std(z) - 1) < 0.05, i
        assert np.percentile(np.abs(z), 99.99) < 5.0, i
    assert bias.mean() > 0


def test_transforms_hold_in_the_written_noisy_lights(mono: tuple[Path, dict]) -> None:
    """Register as a pipeline would: a star measured in the written light i, mapped through
    its transform, lands where the same star is measured in the written reference. Sky and
    nebula are taken out with the simulator's noiseless model of them (stars excluded), so
    only stars and noise are left. These stars give ~0.1 px of centroid noise per frame
    pair; a wrong rotation sense or offset would show as errors of a pixel or more."""
    out, truth = mono
    sim = Simulation(SimOptions(out=out, **MONO))
    stars = _good_stars(sim, [1, 4, 5], min_flux=3e3)
    assert len(stars) >= 3
    dark = _master(out, truth["calibration"]["darks"])

    def prepared(i: int) -> np.ndarray:
        img = _data(out / truth["lights"][i]["file"]) - dark
        return img - sim.light_expected(i, stars=False, transients=False) / truth["gain"]

    ref = prepared(0)
    errors = []
    for i in (1, 4, 5):
        img = prepared(i)
        m = np.array(truth["lights"][i]["transform"])
        for k in stars:
            qx, qy = _centroid(ref, float(sim.stars.x[k]), float(sim.stars.y[k]))
            gx, gy = apply_affine(invert_affine(m), qx, qy)
            cx, cy = _centroid(img, gx, gy)
            rx, ry = apply_affine(m, cx, cy)
            errors.append(math.hypot(rx - qx, ry - qy))
    assert np.median(errors) < 0.35
    assert max(errors) < 0.9


# ----------------------------------------------------------------- files and headers


def test_file_layout_counts_and_truth(mono: tuple[Path, dict]) -> None:
    out, truth = mono
    assert json.loads((out / "truth.json").read_text()) == truth
    lights = sorted((out / "lights").rglob("*.fits"))
    assert len(lights) == 6 and len(truth["lights"]) == 6
    assert lights[0].name == "M42_L_60s_0001.fits" and lights[0].parent.name == "L"
    assert len(list((out / "calibration/bias").glob("bias_*.fits"))) == 4
    assert len(list((out / "calibration/darks").glob("dark_60s_*.fits"))) == 3
    assert len(list((out / "calibration/flats/L").glob("flat_L_*.fits"))) == 3
    assert truth["reference"] == truth["lights"][0]["file"]
    status = [light["expected_status"] for light in truth["lights"]]
    assert status == ["stacked", "stacked", "stacked", "rejected", "stacked", "stacked"]
    assert truth["lights"][3]["expected_reason"] == "clouds"
    assert truth["lights"][2]["expected_reason"] is None
    sky = fits.getdata(out / "truth_sky.fits")
    assert sky.shape == (H, W) and sky.dtype.kind == "f" and sky.dtype.itemsize == 4
    inside = [s for s in truth["stars"] if -0.5 <= s["x"] < W - 0.5 and -0.5 <= s["y"] < H - 0.5]
    assert len(inside) == len(truth["stars"]) > 50


def test_headers_on_every_kind(mono: tuple[Path, dict]) -> None:
    out, truth = mono
    expected = {
        "bias": "Bias Frame",
        "darks": "Dark Frame",
        "flats": "Flat Field",
        "lights": "Light Frame",
    }
    paths = {
        "bias": truth["calibration"]["bias"],
        "darks": truth["calibration"]["darks"],
        "flats": truth["calibration"]["flats"]["L"],
        "lights": [light["file"] for light in truth["lights"]],
    }
    for kind, files in paths.items():
        for rel in files:
            with fits.open(out / rel, do_not_scale_image_data=True) as hdul:
                hdr, raw = hdul[0].header, hdul[0].data
                assert hdr["BITPIX"] == 16 and hdr["BZERO"] == 32768 and raw.dtype.kind == "i"
            data = fits.getdata(out / rel)
            assert data.dtype == np.uint16 and data.shape == (H, W)
            assert hdr["IMAGETYP"] == expected[kind]
            assert hdr["SIMPLE"] is True
            assert hdr["GAIN"] == 100 and hdr["OFFSET"] == 50 and hdr["EGAIN"] == 0.8
            assert abs(hdr["CCD-TEMP"] - hdr["SET-TEMP"]) < 0.6 and hdr["SET-TEMP"] == -10.0
            assert hdr["XBINNING"] == hdr["YBINNING"] == 1
            assert hdr["XPIXSZ"] == 3.76 and hdr["FOCALLEN"] == 530.0
            assert hdr["INSTRUME"] and hdr["SWCREATE"] == "subwatch simulate"
            assert "BAYERPAT" not in hdr
            datetime.fromisoformat(hdr["DATE-OBS"])
            exptime = {"bias": 0.0, "darks": 60.0, "lights": 60.0}.get(kind)
            if exptime is not None:
                assert hdr["EXPTIME"] == exptime
            else:
                assert 0 < hdr["EXPTIME"] < 10
            assert ("FILTER" in hdr) == (kind in ("flats", "lights"))
            if kind == "lights":
                assert hdr["FILTER"] == "L" and hdr["OBJECT"] == "M42"
                assert abs(hdr["RA"] - 83.82) < 0.1 and abs(hdr["DEC"] + 5.39) < 0.1
            else:
                assert "OBJECT" not in hdr


def test_mtimes_follow_capture_order(mono: tuple[Path, dict]) -> None:
    out, truth = mono
    cal = truth["calibration"]
    order = cal["bias"] + cal["darks"] + cal["flats"]["L"] + [x["file"] for x in truth["lights"]]
    mtimes = [os.stat(out / rel).st_mtime for rel in order]
    assert all(b > a for a, b in itertools.pairwise(mtimes))
    for light, mtime in zip(truth["lights"], mtimes[-6:], strict=True):
        start = datetime.fromisoformat(light["date_obs"] + "+00:00").timestamp()
        assert abs(mtime - (start + 60.0)) < 1e-3
    by_mtime = sorted(order, key=lambda rel: os.stat(out / rel).st_mtime)
    assert by_mtime == order


# ----------------------------------------------------------------- camera physics


def test_bias_level_and_read_noise(mono: tuple[Path, dict]) -> None:
    out, truth = mono
    b1, b2 = (_data(out / rel) for rel in truth["calibration"]["bias"][:2])
    assert abs(b1.mean() - truth["bias_adu"]) < 3.0
    temporal = np.std(b1 - b2) / math.sqrt(2)
    expected = math.hypot(truth["read_noise_e"] / truth["gain"], math.sqrt(1 / 12))
    assert abs(temporal / expected - 1) < 0.05
    # The fixed pattern is there too: column means differ by more than noise alone allows.
    cols = (0.5 * (b1 + b2)).mean(axis=0)
    assert cols.std() > 5 * expected / math.sqrt(2 * H)


def test_hot_pixels_stay_put(mono: tuple[Path, dict]) -> None:
    out, truth = mono
    darks = [_data(out / rel) for rel in truth["calibration"]["darks"]]
    hot_sets = []
    for d in darks:
        med = np.median(d)
        ys, xs = np.nonzero(d > med + 30)
        hot_sets.append(set(zip(xs.tolist(), ys.tolist(), strict=True)))
    for other in hot_sets[1:]:
        jaccard = len(hot_sets[0] & other) / len(hot_sets[0] | other)
        assert jaccard > 0.9
    known = {tuple(p) for p in truth["hot_pixels"]}
    assert len(hot_sets[0] & known) >= 0.9 * len(known)
    assert len(hot_sets[0] - known) <= 0.1 * len(known)


def test_flats_show_vignetting_and_sit_near_half_well(mono: tuple[Path, dict]) -> None:
    out, truth = mono
    flat = _master(out, truth["calibration"]["flats"]["L"]) - _master(
        out, truth["calibration"]["bias"]
    )
    centre = np.median(flat[H // 2 - 20 : H // 2 + 20, W // 2 - 20 : W // 2 + 20])
    corners = [flat[:12, :12], flat[:12, -12:], flat[-12:, :12], flat[-12:, -12:]]
    assert all(np.median(c) < 0.85 * centre for c in corners)
    assert 0.4 < centre * truth["gain"] / truth["full_well"] < 0.65


def test_light_noise_matches_shot_and_read_noise(mono: tuple[Path, dict]) -> None:
    """Calibrate light 0 with the simulated frames; what is left is noise of known size."""
    out, truth = mono
    gain, rn = truth["gain"], truth["read_noise_e"]
    bias = _master(out, truth["calibration"]["bias"])
    flat = _master(out, truth["calibration"]["flats"]["L"]) - bias
    flat /= np.median(flat[H // 4 : 3 * H // 4, W // 4 : 3 * W // 4])
    light = _data(out / truth["reference"])
    sky_e = fits.getdata(out / "truth_sky.fits").astype(np.float64)
    resid = light - bias - sky_e * flat / gain
    var = sky_e * flat / gain**2 + (rn / gain) ** 2 * (1 + 1 / len(truth["calibration"]["bias"]))
    z = resid / np.sqrt(var + 1 / 12)
    mask = sky_e < 2 * np.median(sky_e)
    for x, y in truth["hot_pixels"]:
        mask[max(0, y - 1) : y + 2, max(0, x - 1) : x + 2] = False
    zz = z[mask]
    robust_std = 1.4826 * np.median(np.abs(zz - np.median(zz)))
    assert abs(robust_std - 1) < 0.07
    assert abs(np.median(zz)) < 0.1
    # No structure is left: dust donuts, vignetting and the bias pattern calibrate away, so
    # the residual averaged over 9x9 boxes is as small as averaging noise makes it.
    zm = np.where(mask, np.clip(z, -5, 5), 0.0)
    box = ndimage.uniform_filter(zm, 9) / np.maximum(ndimage.uniform_filter(mask * 1.0, 9), 1e-9)
    full = ndimage.uniform_filter(mask * 1.0, 9) > 0.99
    assert np.abs(box[full]).max() < 6 / 9
    # and the background level itself, in ADU, is the truth's sky level through the flat
    centre_sky = np.median((light - bias)[H // 2 - 10 : H // 2 + 10, W // 2 - 10 : W // 2 + 10])
    assert 0.5 * truth["lights"][0]["sky_e"] / gain < centre_sky


def _detect(img: np.ndarray) -> tuple[int, float]:
    bg = _background(img)
    res = img - bg
    sigma = 1.4826 * np.median(np.abs(res - np.median(res)))
    peaks = (res == ndimage.maximum_filter(res, size=7)) & (res > 10 * sigma)
    return int(peaks[10:-10, 10:-10].sum()), float(np.median(img))


def test_cloud_frame_loses_stars_and_gains_sky(mono: tuple[Path, dict]) -> None:
    out, truth = mono
    clear, clear_bg = _detect(_data(out / truth["lights"][1]["file"]))
    cloudy, cloudy_bg = _detect(_data(out / truth["lights"][3]["file"]))
    clouds = truth["lights"][3]["defects"][0]
    assert clouds["type"] == "clouds" and clouds["transparency"] < 0.4
    assert cloudy < 0.7 * clear
    assert cloudy_bg - truth["bias_adu"] > 1.4 * (clear_bg - truth["bias_adu"])


def test_trail_and_cosmic_rays_where_truth_says(mono: tuple[Path, dict]) -> None:
    out, truth = mono
    light = truth["lights"][2]
    img = _data(out / light["file"])
    trail = next(d for d in light["defects"] if d["type"] == "trail")
    x0, y0, x1, y1 = trail["x0"], trail["y0"], trail["x1"], trail["y1"]
    for v in (x0, x1):
        assert -0.01 <= v <= W - 0.99
    for v in (y0, y1):
        assert -0.01 <= v <= H - 0.99
    length = math.hypot(x1 - x0, y1 - y0)
    nx, ny = -(y1 - y0) / length, (x1 - x0) / length
    t = np.linspace(0.05, 0.95, 200)
    offsets = np.arange(-8, 9)
    profile = []
    for off in offsets:
        xs = np.clip(np.rint(x0 + t * (x1 - x0) + off * nx).astype(int), 0, W - 1)
        ys = np.clip(np.rint(y0 + t * (y1 - y0) + off * ny).astype(int), 0, H - 1)
        profile.append(np.median(img[ys, xs]))
    profile = np.array(profile)
    assert abs(offsets[int(np.argmax(profile))]) <= 1
    assert profile[8] - np.median(profile[[0, 1, -2, -1]]) > 500  # ADU above the sky
    cosmic = next(d for d in light["defects"] if d["type"] == "cosmic_rays")
    assert 5 <= len(cosmic["positions"]) <= 15
    local = ndimage.median_filter(img, size=5)
    for x, y in cosmic["positions"]:
        assert img[y, x] - local[y, x] > 300


# ----------------------------------------------------------------- colour and filters


def test_osc_mosaic_follows_bayerpat(osc: tuple[Path, dict]) -> None:
    out, truth = osc
    hdr = fits.getheader(out / truth["reference"])
    assert hdr["BAYERPAT"] == "GBRG" and hdr["XBAYROFF"] == 0 and hdr["YBAYROFF"] == 0
    assert "FILTER" not in hdr and truth["lights"][0]["filter"] is None
    flat = _master(out, truth["calibration"]["flats"]["OSC"]) - _master(
        out, truth["calibration"]["bias"]
    )
    core = flat[H // 4 : 3 * H // 4, W // 4 : 3 * W // 4]
    site = {}
    for k, letter in enumerate(hdr["BAYERPAT"]):
        dy, dx = divmod(k, 2)
        site.setdefault(letter, []).append(core[dy::2, dx::2].mean())
    g1, g2 = site["G"]
    assert abs(g1 / g2 - 1) < 0.01
    assert g1 > 1.15 * site["R"][0] and site["R"][0] > 1.1 * site["B"][0]
    cube = fits.getdata(out / "truth_sky.fits")
    assert cube.shape == (3, H, W)
    # The nebula glows in H-alpha: in the reference sky the red plane exceeds the blue.
    assert np.median(cube[0]) > np.median(cube[2])


def test_narrowband_sky_is_dark_and_filters_alternate() -> None:
    opts = SimOptions(
        out=Path("unused"),
        width=96,
        height=64,
        lights=4,
        filters=("L", "Ha"),
        filter_order="roundrobin",
    )
    sim = Simulation(opts)
    assert [p.label for p in sim.plans] == ["L", "Ha", "L", "Ha"]
    assert sim.sky_level(1)[0] < 0.05 * sim.sky_level(0)[0]
    sig_l = sim.light_signal(0, stars=False, glow=False)[0]
    sig_ha = sim.light_signal(1, stars=False, glow=False)[0]
    assert sig_ha.max() > 0.3 * sig_l.max()  # emission survives the narrowband filter
    truth = sim.truth()
    assert set(truth["calibration"]["flats"]) == {"L", "Ha"}


# ----------------------------------------------------------------- live writing


def test_chunked_writer_exposes_partial_files(tmp_path: Path) -> None:
    data = np.arange(64 * 48, dtype=np.uint16).reshape(48, 64)
    payload = fits_bytes(data, fits.Header())
    path = tmp_path / "x.fits"
    seen: list[tuple[int, int]] = []
    write_chunked(
        path, payload, chunks=4, pause=0.0, on_chunk=lambda p, n: seen.append((n, p.stat().st_size))
    )
    assert [n for n, _ in seen] == sorted(n for n, _ in seen)
    assert all(n == size for n, size in seen)
    assert seen[0][0] == header_length(payload) and seen[0][0] % 2880 == 0
    assert len(seen) == 5 and seen[-1][0] == len(payload)
    assert all(size < len(payload) for _, size in seen[:-1])
    assert path.read_bytes() == payload


def test_interval_writes_lights_one_by_one(tmp_path: Path) -> None:
    out = tmp_path / "live"
    opts = SimOptions(out=out, width=96, height=64, lights=3, interval=0.5, calibration=False)
    stamps: list[tuple[float, Path]] = []
    sizes: list[tuple[Path, int]] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            for p in out.glob("lights/**/*.fits"):
                try:
                    sizes.append((p, p.stat().st_size))
                except FileNotFoundError:
                    continue
            time.sleep(0.001)

    def on_file(path: Path) -> None:
        stamps.append((time.monotonic(), path))
        names = [x["file"] for x in json.loads((out / "truth.json").read_text())["lights"]]
        done = len(stamps)
        for rel in names[done:]:
            assert not (out / rel).exists()

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    try:
        simulate_session(opts, on_file=on_file)
    finally:
        stop.set()
        watcher.join()
    assert len(stamps) == 3
    gaps = np.diff([t for t, _ in stamps])
    assert np.all(gaps > 0.4)
    partial = [p for p, size in sizes if size < p.stat().st_size]
    assert partial, "a reader never saw a light before it was complete"
    assert time.time() - stamps[-1][1].stat().st_mtime < 60  # live files keep real mtimes


# ----------------------------------------------------------------- command line


def test_defect_spec_and_sprinkle() -> None:
    assert parse_defects("3:trail,5:clouds,5:cr,6:trailed+defocused") == {
        3: ["trail"],
        5: ["clouds", "cosmic_rays"],
        6: ["trailed", "defocus"],
    }
    with pytest.raises(ValueError):
        parse_defects("2:meteor")
    for n in (3, 4, 5, 8, 12):
        spread = sprinkle_defects(n)
        kinds = [k for ks in spread.values() for k in ks]
        assert sorted(kinds) == sorted(["trail", "cosmic_rays", "clouds", "trailed", "defocus"])
        assert min(spread) >= 2
    spread = sprinkle_defects(8)
    for index, ks in spread.items():
        if "trail" in ks or "cosmic_rays" in ks:
            assert not {"clouds", "trailed", "defocus"} & set(ks), index


def test_cli_runs_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        [
            "--out",
            str(tmp_path / "cli"),
            "--lights",
            "7",
            "--width",
            "96",
            "--height",
            "64",
            "--all-defects",
            "--flip-at",
            "5",
            "--filters",
            "Ha",
            "--no-calibration",
        ]
    )
    assert run_cli(args) == 0
    said = capsys.readouterr().out
    assert "7 lights" in said and "truth.json" in said
    truth = json.loads((tmp_path / "cli" / "truth.json").read_text())
    assert truth["filters"] == ["Ha"] and truth["meridian_flip_at"] == 5
    assert [x["flipped"] for x in truth["lights"]] == [False] * 5 + [True] * 2
    reasons = {x["expected_reason"] for x in truth["lights"]} - {None}
    assert reasons == {"clouds", "trailed", "defocused"}
    assert truth["lights"][0]["defects"] == [] and truth["lights"][1]["defects"] == []
    assert not (tmp_path / "cli" / "calibration").exists()
