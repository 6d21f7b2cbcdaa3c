"""The denoiser network and the shipped ONNX file honour the contract inference relies on."""

from __future__ import annotations

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
