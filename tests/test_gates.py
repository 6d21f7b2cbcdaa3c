"""Quality gates: bad subs rejected with the right reason, good subs kept."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from subwatch.config import Config, GatesConfig
from subwatch.measure import Background, FrameMeasurement, Gradient, StarList
from subwatch.measure.quality import GateHistory, judge
from subwatch.service.daemon import run_daemon
from subwatch.simulate import SimOptions, simulate_session


def _measurement(
    n: int = 200,
    flux: float = 1e4,
    fwhm: float = 3.0,
    ecc: float = 0.2,
    bkg: float = 1000.0,
    saturated: int = 0,
) -> FrameMeasurement:
    sat = np.zeros(n, bool)
    sat[:saturated] = True
    stars = StarList(
        x=np.zeros(n),
        y=np.zeros(n),
        flux=np.full(n, flux),
        peak=np.full(n, flux / 10),
        sigma=np.full(n, fwhm / 2.3548),
        eccentricity=np.full(n, ecc),
        saturated=sat,
        snr=np.full(n, 50.0),
    )
    background = Background(level=bkg, noise=10.0, mesh=np.full((4, 4), bkg), box=64)
    return FrameMeasurement(
        background=background,
        gradient=Gradient(0.0, 0.0, 0.0),
        stars=stars,
        fwhm=fwhm,
        eccentricity=ecc,
        snr=50.0,
    )


def _history(k: int = 6) -> GateHistory:
    history = GateHistory()
    for _ in range(k):
        history.add(_measurement())
    return history


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({}, None),
        ({"flux": 0.4e4}, "clouds"),  # haze: same stars, dimmer
        ({"n": 80}, "clouds"),  # stars lost
        ({"bkg": 2000.0}, "clouds"),  # sky lit up
        ({"fwhm": 5.0}, "defocused"),
        (
            {"ecc": 0.85, "fwhm": 6.0},
            "trailed",
        ),  # trailed stars are wide too: the reason is the trail
        ({"saturated": 150}, "saturated"),
        ({"n": 5}, "clouds"),
        ({"flux": 0.7e4, "fwhm": 4.0, "bkg": 1400.0}, None),  # a softer, hazier sub is still kept
    ],
)
def test_reasons(kwargs: dict, reason: str | None) -> None:
    assert judge(_measurement(**kwargs), _history(), GatesConfig()) == reason


def test_only_absolute_gates_before_the_warm_up() -> None:
    cfg = GatesConfig()
    assert judge(_measurement(flux=0.1e4), _history(1), cfg) is None
    assert judge(_measurement(n=5), _history(1), cfg) == "too few stars"
    assert judge(_measurement(ecc=0.9), _history(0), cfg) == "trailed"


def test_one_bad_sub_does_not_move_the_bar() -> None:
    history = _history(6)
    history.add(_measurement(flux=100.0, n=10, bkg=9000.0))  # slipped through with gates off
    assert judge(_measurement(flux=0.4e4), history, GatesConfig()) == "clouds"
    assert judge(_measurement(), history, GatesConfig()) is None


def test_gates_disabled_accept_everything() -> None:
    assert judge(_measurement(n=2, ecc=0.99), _history(), GatesConfig(enabled=False)) is None


DEFECTS = {
    4: ["clouds"],
    7: ["trail"],
    9: ["trailed"],
    12: ["cosmic_rays"],
    14: ["defocus"],
    17: ["trail", "cosmic_rays"],
    19: ["clouds"],
}


def test_a_simulated_night_is_judged_like_truth(tmp_path: Path) -> None:
    capture = tmp_path / "capture"
    truth = simulate_session(
        SimOptions(
            out=capture,
            lights=24,
            width=480,
            height=360,
            seed=21,
            defects=DEFECTS,
            calibration=False,
        )
    )
    out = tmp_path / "out"
    run_daemon(
        Config.model_validate({"watch": {"path": str(capture)}, "output": {"path": str(out)}}),
        once=True,
    )
    rows = {
        json.loads(x)["file"]: json.loads(x)
        for x in (out / "frames.jsonl").read_text().splitlines()
    }
    good = [t for t in truth["lights"] if t["expected_status"] == "stacked"]
    bad = [t for t in truth["lights"] if t["expected_status"] == "rejected"]
    assert len(bad) == 4
    for t in bad:
        assert rows[t["file"]]["status"] == "rejected"
        assert rows[t["file"]]["reason"] == t["expected_reason"], t["file"]
    wrongly_rejected = [t["file"] for t in good if rows[t["file"]]["status"] != "stacked"]
    assert len(wrongly_rejected) <= 0.05 * len(good), wrongly_rejected
