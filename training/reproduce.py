"""Reproduce the shipped denoiser: ``python -m training.reproduce``.

The shipped model comes from training stages run one after the other, each starting from the
weights of the one before (``train.py --init``), with fresh batches (another seed) and a lower
learning rate: the 8000-iteration recipe from random weights, then longer fine-tuning. On this
machine that was cheaper to grow and to check stage by stage than one long run, and each
stage's gain is measured (benchmarks/RESULTS.md, docs/decisions.md). Every stage is a function
of its arguments, so the chain is too.

Each stage writes ``training/runs/<name>/`` (log, validation, facts, model.pt; ``--root``
moves them), the last one's weights are exported to the package with the chain's version. A
stage whose ``model.pt`` exists is not run again, and a stage that was interrupted carries on
from its checkpoint, so an interrupted reproduction is resumed by running the same command.
``--device cuda`` and ``--workers N`` pass through to every stage.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from training.train import ROOT

DEFAULT_EXPORT = ROOT / "daemon" / "subwatch" / "models" / "denoiser.onnx"


@dataclass(frozen=True)
class Stage:
    name: str
    seed: int
    iters: int
    lr: float

    @property
    def label(self) -> str:
        return f"seed{self.seed}-it{self.iters}"


#: The shipped chain, in order. The first stage is ``train.py``'s defaults.
STAGES = (
    Stage("base", seed=7, iters=8000, lr=1e-3),
    Stage("finetune1", seed=8, iters=12000, lr=5e-4),
    Stage("finetune2", seed=9, iters=12000, lr=3e-4),
)


def version(stages: tuple[Stage, ...] | list[Stage]) -> str:
    """The exported model's version: the architecture's, then every stage of the chain."""
    return "1.1-" + "+".join(s.label for s in stages)


def stage_args(stage: Stage, out: Path, init: Path | None, extra: list[str]) -> list[str]:
    """``train.py`` arguments of one stage (its ONNX stays in its folder)."""
    argv = ["--seed", str(stage.seed), "--iters", str(stage.iters), "--lr", str(stage.lr)]
    argv += ["--out", str(out), "--export", str(out / "denoiser.onnx"), *extra]
    if init is not None:
        argv += ["--init", str(init)]
    if (out / "checkpoint.pt").is_file():
        argv.append("--resume")
    return argv


def reproduce(
    stages: tuple[Stage, ...] | list[Stage],
    root: Path,
    export: Path,
    extra: list[str] | None = None,
) -> Path:
    """Run the stages that have no model yet, export the last; returns the exported file."""
    from training.export import main as export_main
    from training.train import main as train_main

    init: Path | None = None
    for stage in stages:
        out = root / stage.name
        if not (out / "model.pt").is_file():
            print(f"stage {stage.name}: {stage.label}, learning rate {stage.lr}", flush=True)
            if train_main(stage_args(stage, out, init, list(extra or []))) != 0:
                raise SystemExit(f"stage {stage.name} failed")
        init = out / "model.pt"
    assert init is not None
    export_main([str(init), str(export), "--version", version(stages)])
    return export


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=ROOT / "training" / "runs")
    ap.add_argument("--export", type=Path, default=DEFAULT_EXPORT)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=0)
    args = ap.parse_args(argv)
    extra = ["--device", args.device, "--workers", str(args.workers)]
    reproduce(STAGES, args.root, args.export, extra)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
