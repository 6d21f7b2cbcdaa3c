"""The denoiser network and the shipped ONNX file honour the contract inference relies on."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
ONNX = ROOT / "daemon" / "subwatch" / "models" / "denoiser.onnx"
sys.path.insert(0, str(ROOT))  # training/ is a directory of the repository, not the package


def test_network_budget() -> None:
    pytest.importorskip("torch")
    from training.model import MULTIPLE_OF, UNet, count_params, macs_per_pixel

    model = UNet()
    assert macs_per_pixel(model) <= 50_000
    assert count_params(model) * 4 < 5_000_000
    import torch

    with torch.no_grad():
        out = model(torch.zeros(2, 2, 8 * MULTIPLE_OF, 12 * MULTIPLE_OF))
    assert out.shape == (2, 1, 8 * MULTIPLE_OF, 12 * MULTIPLE_OF)


def test_shipped_onnx_contract() -> None:
    ort = pytest.importorskip("onnxruntime")
    assert ONNX.exists()
    assert ONNX.stat().st_size <= 5_000_000
    sess = ort.InferenceSession(str(ONNX), providers=["CPUExecutionProvider"])
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    assert inp.name == "input" and out.name == "output"
    assert inp.shape[1] == 2 and out.shape[1] == 1
    meta = sess.get_modelmeta().custom_metadata_map
    step = int(meta["multiple_of"])
    assert int(meta["receptive_field"]) > 0 and meta["version"]

    # a flat sky with unit white noise: the output must be much quieter, and unbiased
    rng = np.random.default_rng(0)
    h, w = 24 * step, 20 * step
    x = np.ones((1, 2, h, w), dtype=np.float32)
    x[0, 0] = rng.normal(0.0, 1.0, (h, w))
    y = sess.run(["output"], {"input": x})[0]
    assert y.shape == (1, 1, h, w) and y.dtype == np.float32
    core = y[0, 0, 24:-24, 24:-24]
    assert float(np.std(core)) < 0.5
    assert abs(float(np.mean(core))) < 0.1


def test_a_run_stopped_for_time_and_resumed_equals_one_straight_through(tmp_path: Path) -> None:
    """--max-minutes stops at a checkpoint (a GPU lease ends commands after minutes) and
    --resume continues: same iterations, same weights as one uninterrupted run."""
    torch = pytest.importorskip("torch")
    from training.train import main

    common = ["--iters", "4", "--batch", "2", "--size", "32", "--warmup", "2", "--device", "cpu"]
    common += ["--val-every", "100", "--early-export-at", "0", "--final-scenes", "1"]
    common += ["--log-every", "1"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main([*common, "--out", str(straight), "--export", str(straight / "m.onnx")]) == 0
    args = [*common, "--out", str(split), "--export", str(split / "m.onnx")]
    assert main([*args, "--max-minutes", "0"]) == 0  # stops after the first iteration
    assert not (split / "model.pt").exists()
    first = torch.load(split / "checkpoint.pt", weights_only=False)
    assert first["iter"] == 1
    log_before = (split / "log.csv").read_text()
    assert main([*args, "--resume", "--workers", "1"]) == 0
    assert (split / "log.csv").read_text().startswith(log_before)  # continued, not restarted

    def rows(path: Path) -> list[list[str]]:  # every column but the wall time
        return [line.split(",")[:1] + line.split(",")[2:] for line in path.read_text().splitlines()]

    assert rows(split / "log.csv") == rows(straight / "log.csv")
    assert len(rows(straight / "log.csv")) == 5  # the header and iterations 1..4
    a = torch.load(straight / "model.pt")["model"]
    b = torch.load(split / "model.pt")["model"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_init_starts_from_the_given_weights(tmp_path: Path) -> None:
    """--init fine-tunes a trained model (new scenes, a new schedule) instead of starting
    from random weights: with a learning rate of 0 the weights come out as they went in."""
    torch = pytest.importorskip("torch")
    from training.train import main

    common = ["--batch", "2", "--size", "32", "--warmup", "1", "--device", "cpu"]
    common += ["--val-every", "100", "--early-export-at", "0", "--final-scenes", "1"]
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert main([*common, "--iters", "2", "--out", str(a), "--export", str(a / "m.onnx")]) == 0
    frozen = [*common, "--iters", "1", "--lr", "0", "--seed", "3"]
    assert (
        main(
            [*frozen, "--init", str(a / "model.pt"), "--out", str(b), "--export", str(b / "m.onnx")]
        )
        == 0
    )
    assert main([*frozen, "--out", str(c), "--export", str(c / "m.onnx")]) == 0
    trained = torch.load(a / "model.pt")["model"]
    for k, v in torch.load(b / "model.pt")["model"].items():
        torch.testing.assert_close(v, trained[k], rtol=0, atol=0)
    fresh = torch.load(c / "model.pt")["model"]
    assert any(not torch.equal(fresh[k], trained[k]) for k in trained)
    assert json.loads((b / "facts.json").read_text())["version"].endswith("-ft")


def test_shuffled_network_exports_its_own_grid_and_runs_through_inference(tmp_path: Path) -> None:
    """The half-resolution variant: a quarter of the multiply-adds, an 8-px grid that the
    ONNX metadata carries and the tiled inference honours on a frame of any size."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    from training.export import export_onnx
    from training.model import ShuffleUNet, UNet, build, macs_per_pixel

    from subwatch.enhance.denoise import DenoiseSettings, load_denoiser

    torch.manual_seed(0)
    net = build("shuffle", 16)
    assert isinstance(net, ShuffleUNet) and net.multiple_of == 8
    assert macs_per_pixel(net) < 0.3 * macs_per_pixel(UNet(16))
    path = tmp_path / "shuffle.onnx"
    facts = export_onnx(net, path, version="test")
    assert facts["multiple_of"] == 8 and facts["receptive_field"] > 44
    denoiser, why = load_denoiser(DenoiseSettings(model=str(path), tile=128, overlap=16))
    assert denoiser is not None, why
    rng = np.random.default_rng(1)
    image = (1000.0 + 8.0 * rng.standard_normal((150, 203))).astype(np.float32)
    out = denoiser(image, strength=1.0)
    assert out.shape == image.shape and np.all(np.isfinite(out))
    assert denoiser.info["tiles"] > 1


def test_reproduce_runs_the_chain_once_and_ships_the_last_stage(tmp_path: Path) -> None:
    """Each stage starts from the one before; a finished stage is not run again; the shipped
    file carries the whole chain in its version."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    from training.reproduce import Stage, reproduce

    from subwatch.enhance.denoise import load_network

    stages = (Stage("one", seed=1, iters=2, lr=1e-3), Stage("two", seed=2, iters=1, lr=0.0))
    extra = ["--batch", "2", "--size", "32", "--warmup", "1", "--device", "cpu"]
    extra += ["--val-every", "100", "--early-export-at", "0", "--final-scenes", "1"]
    shipped = reproduce(stages, tmp_path, tmp_path / "shipped.onnx", extra)
    first = torch.load(tmp_path / "one" / "model.pt")["model"]
    for k, v in torch.load(tmp_path / "two" / "model.pt")["model"].items():
        torch.testing.assert_close(v, first[k], rtol=0, atol=0)  # learning rate 0: unchanged
    assert load_network(shipped).metadata["version"] == "1.1-seed1-it2+seed2-it1"
    stamp = (tmp_path / "one" / "model.pt").stat().st_mtime_ns
    reproduce(stages, tmp_path, tmp_path / "again.onnx", extra)
    assert (tmp_path / "one" / "model.pt").stat().st_mtime_ns == stamp
