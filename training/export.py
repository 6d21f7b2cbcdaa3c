"""Export a trained network to the ONNX file subwatch ships, and check it against torch.

The file carries its contract in ``metadata_props``: ``multiple_of`` (H and W must be
multiples of it), ``receptive_field`` (px; inference tiles need a margin of half of it),
``version``, and the input/output description. Opset 17, dynamic N, H and W.

    python -m training.export training/runs/shipped/model.pt daemon/subwatch/models/denoiser.onnx
"""

from __future__ import annotations

import argparse
import copy
import json
import warnings
from pathlib import Path

import numpy as np
import torch

from training.model import build, count_params, macs_per_pixel, receptive_field

OPSET = 17
CONTRACT = (
    "input [N,2,H,W] float32: channel 0 = forward(x, noise_model) - c (c: median over the image),"
    " channel 1 = noise std map in the same units (1 at full depth); output [N,1,H,W] float32:"
    " denoised channel 0, same units. H, W multiples of multiple_of."
)


def export_onnx(model: torch.nn.Module, path: Path, version: str) -> dict[str, float]:
    """Write ``model`` to ``path`` and verify it with onnxruntime; returns the facts recorded."""
    import onnx
    import onnxruntime as ort

    model = copy.deepcopy(model).cpu().eval()  # a CPU copy: training may go on on a GPU
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.onnx")
    dyn = {0: "N", 2: "H", 3: "W"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(1, 2, 64, 64),),
            str(tmp),
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": dyn, "output": dyn},
            opset_version=OPSET,
            dynamo=False,
        )
    facts = {
        "multiple_of": model.multiple_of,
        "receptive_field": receptive_field(model),
        "params": count_params(model),
        "macs_per_pixel": macs_per_pixel(model),
    }
    proto = onnx.load(str(tmp))
    meta = {
        "multiple_of": str(model.multiple_of),
        "receptive_field": str(facts["receptive_field"]),
        "version": version,
        "contract": CONTRACT,
        "macs_per_pixel": str(int(facts["macs_per_pixel"])),
    }
    del proto.metadata_props[:]
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    proto.doc_string = "subwatch denoiser: residual U-Net in generalised-Anscombe units"
    onnx.checker.check_model(proto)
    onnx.save(proto, str(tmp))

    rng = np.random.default_rng(0)
    x = (rng.normal(size=(2, 2, 64, 96)) * 3).astype(np.float32)
    x[:, 1] = np.abs(x[:, 1]) / 3 + 1
    sess = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    got = sess.run(["output"], {"input": x})[0]
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    diff = float(np.abs(got - ref).max())
    if diff >= 1e-4:
        raise RuntimeError(f"onnxruntime and torch disagree by {diff}")
    tmp.replace(path)
    facts["onnx_max_abs_diff"] = diff
    facts["bytes"] = path.stat().st_size
    return facts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--version", default="1")
    args = ap.parse_args(argv)
    state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    model = build(str(state.get("arch", "unet")), int(state.get("width", 16)))
    model.load_state_dict(state["model"])
    print(json.dumps(export_onnx(model, args.out, args.version), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
