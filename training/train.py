"""Train the denoiser from a seed: ``python -m training.train`` runs the first stage of the
shipped model (``training.reproduce`` runs them all and ships the result).

Recipe: residual U-Net (``training.model``), batches of synthetic 96x96 scenes
(``training.scenes``) with noise redrawn every batch, MSE in GAT units, Adam with a short
linear warm-up then cosine decay, gradient norm clipped at 1. The batch of iteration ``i`` is
drawn from ``numpy.random.default_rng([seed, i])`` and the weights start from
``torch.manual_seed(seed)``, so a run is a function of its arguments, and resuming from a
checkpoint gives the same model as running straight through.

Outputs in ``--out``: ``log.csv`` (iteration, wall time, learning rate, mean loss, quick
validation), ``checkpoint.pt`` (every few minutes; ``--resume`` continues from it),
``model.pt``, ``validation.json``, ``facts.json``; the ONNX file goes to ``--export``, once
early (``--early-export-at``) so inference can be tried against the real contract, and at the
end.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from training.export import export_onnx
from training.model import ARCHITECTURES, build, count_params, macs_per_pixel, receptive_field
from training.scenes import batches
from training.validate import validate

ROOT = Path(__file__).resolve().parents[1]


def lr_at(it: int, iters: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 2 % of ``lr``."""
    if it < warmup:
        return lr * (it + 1) / warmup
    t = (it - warmup) / max(iters - warmup, 1)
    return lr * (0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0))))


def _save(obj: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def _plain_args(args: argparse.Namespace) -> dict[str, object]:
    """Arguments as JSON-able values, paths relative to the repository when inside it."""
    out: dict[str, object] = {}
    for k, v in vars(args).items():
        if isinstance(v, Path):
            v = str(v.resolve().relative_to(ROOT)) if v.resolve().is_relative_to(ROOT) else str(v)
        out[k] = v
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Train the subwatch denoiser.")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--iters", type=int, default=8000)
    ap.add_argument("--stop-at", type=int, default=None, help="end early, schedule unchanged")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--arch", choices=sorted(ARCHITECTURES), default="unet")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "training" / "runs" / "base")
    ap.add_argument(
        "--export",
        type=Path,
        default=None,
        help="the ONNX file (default: denoiser.onnx in --out; training.reproduce ships it)",
    )
    ap.add_argument("--early-export-at", type=int, default=500)
    ap.add_argument("--val-every", type=int, default=250)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--checkpoint-minutes", type=float, default=4.0)
    ap.add_argument("--final-scenes", type=int, default=16, help="validation scenes per depth")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument(
        "--init",
        type=Path,
        default=None,
        help="start from these weights (a model.pt) instead of random ones",
    )
    ap.add_argument(
        "--device", default="auto", help="cpu, cuda, or auto (cuda when torch sees a GPU)"
    )
    ap.add_argument(
        "--workers",
        type=int,
        default=0,
        help="processes drawing the batches ahead of the training step (0: in this process)",
    )
    ap.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="checkpoint and stop after this long; --resume carries on (for time-limited runs)",
    )
    args = ap.parse_args(argv)
    if args.export is None:
        args.export = args.out / "denoiser.onnx"
    return args


def _device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = _device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    model = build(args.arch, args.width)
    stop = args.iters if args.stop_at is None else min(args.stop_at, args.iters)
    facts = {
        "params": count_params(model),
        "macs_per_pixel": macs_per_pixel(model),
        "receptive_field": receptive_field(model),
    }
    if args.init is not None:
        model.load_state_dict(torch.load(args.init, map_location="cpu", weights_only=True)["model"])
    # On the device before the optimiser exists: a resumed optimiser's state then follows
    # its parameters there by itself (load_state_dict casts it).
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    print(
        f"{args.arch} width {args.width}: {facts['params']} parameters, "
        f"{facts['macs_per_pixel']:.0f} MAC/px, receptive field {facts['receptive_field']} px, "
        f"on {device}",
        flush=True,
    )

    start, wall_before = 0, 0.0
    ckpt = args.out / "checkpoint.pt"
    log_path = args.out / "log.csv"
    if args.resume and ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start, wall_before = state["iter"], state["wall_s"]
        print(f"resumed at iteration {start}", flush=True)
    else:
        log_path.write_text("iter,wall_s,lr,loss,val_gat_gain_db\n")
    log = log_path.open("a")

    t0 = time.monotonic()
    last_ckpt = t0
    losses: list[float] = []
    model.train()

    def wall() -> float:
        return wall_before + time.monotonic() - t0

    def checkpoint(it: int) -> None:
        _save(
            {
                "model": {k: v.cpu() for k, v in model.state_dict().items()},
                "opt": opt.state_dict(),
                "iter": it,
                "wall_s": wall(),
                "width": args.width,
                "arch": args.arch,
                "args": _plain_args(args),
            },
            ckpt,
        )

    draws = batches(args.seed, start, stop, args.batch, args.size, args.workers)
    for it, (x, y) in zip(range(start, stop), draws, strict=True):
        lr = lr_at(it, args.iters, args.lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        pred = model(torch.from_numpy(x).to(device))
        loss = torch.mean((pred - torch.from_numpy(y).to(device)) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())

        done = it + 1
        val = ""
        if done % args.val_every == 0 or done == stop:
            v = validate(model, per_depth=4)
            val = f"{v['mean_gat_gain_db']:.3f}"
        if done % args.log_every == 0 or val:
            log.write(f"{done},{wall():.1f},{lr:.3e},{np.mean(losses):.5f},{val}\n")
            log.flush()
            print(
                f"it {done} {wall():.0f}s lr {lr:.2e} loss {np.mean(losses):.4f} {val}", flush=True
            )
            losses = []
        if done == args.early_export_at:
            checkpoint(done)
            f = export_onnx(model, args.export, version=f"early-{done}")
            print(f"early export at {done}: {f}", flush=True)
            model.train()
        if time.monotonic() - last_ckpt > args.checkpoint_minutes * 60:
            checkpoint(done)
            last_ckpt = time.monotonic()
        out_of_time = args.max_minutes is not None and time.monotonic() - t0 > args.max_minutes * 60
        if out_of_time and done < stop:
            checkpoint(done)
            log.close()
            draws.close()
            print(f"stopped for time at iteration {done}; --resume carries on", flush=True)
            return 0

    checkpoint(stop)
    log.close()
    train_wall = wall()
    model.eval()
    model.cpu()
    torch.save(
        {"model": model.state_dict(), "width": args.width, "arch": args.arch},
        args.out / "model.pt",
    )
    scores = validate(model, per_depth=args.final_scenes)
    scores["iterations"] = stop
    (args.out / "validation.json").write_text(json.dumps(scores, indent=1) + "\n")
    # The original U-Net keeps its version scheme; another architecture names itself.
    kind = "1.0" if args.arch == "unet" else f"2.0-{args.arch}{args.width}"
    version = f"{kind}-seed{args.seed}-it{stop}" + ("-ft" if args.init is not None else "")
    facts |= export_onnx(model, args.export, version=version)
    facts |= {
        "iterations": stop,
        "train_wall_s": round(train_wall, 1),
        "version": version,
        "args": _plain_args(args),
    }
    (args.out / "facts.json").write_text(json.dumps(facts, indent=1) + "\n")
    print(json.dumps(scores, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
