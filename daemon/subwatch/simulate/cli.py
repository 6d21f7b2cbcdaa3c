"""``subwatch simulate``: the command-line face of the generator."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from subwatch.simulate.night import parse_defects, sprinkle_defects
from subwatch.simulate.session import SimOptions, simulate_session


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the simulator's options to ``parser`` (a sub-command parser, typically)."""
    d = SimOptions(out=Path("."))
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--lights", type=int, default=d.lights, help="number of lights")
    parser.add_argument("--width", type=int, default=d.width)
    parser.add_argument("--height", type=int, default=d.height)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--exptime", type=float, default=d.exptime, help="light exposure, s")
    parser.add_argument("--target", default=d.target, help="OBJECT name")
    parser.add_argument(
        "--filters",
        default=",".join(d.filters),
        help="comma list, e.g. L,R,G,B or Ha,OIII,SII (ignored with --osc)",
    )
    parser.add_argument("--filter-order", choices=("blocks", "roundrobin"), default=d.filter_order)
    parser.add_argument("--osc", action="store_true", help="one-shot-colour (Bayer) sensor")
    parser.add_argument("--bayer", default=d.bayer, choices=("RGGB", "GRBG", "GBRG", "BGGR"))
    parser.add_argument(
        "--flip-at",
        type=int,
        default=None,
        metavar="INDEX",
        help="meridian flip: lights from this 0-based index are turned 180 deg",
    )
    parser.add_argument(
        "--defects",
        default="",
        metavar="SPEC",
        help='e.g. "3:trail,5:clouds,6:cosmic_rays"; types: trail, cosmic_rays, '
        "clouds, trailed, defocus",
    )
    parser.add_argument(
        "--all-defects", action="store_true", help="one defect of each type over lights 2 and up"
    )
    parser.add_argument("--no-calibration", action="store_true", help="write lights only")
    parser.add_argument("--n-bias", type=int, default=d.n_bias)
    parser.add_argument("--n-darks", type=int, default=d.n_darks)
    parser.add_argument("--n-flats", type=int, default=d.n_flats)
    parser.add_argument("--temperature", type=float, default=d.temperature, help="set point, C")
    parser.add_argument(
        "--interval",
        type=float,
        default=None,
        metavar="SEC",
        help="write lights live, one every SEC seconds",
    )


def options_from_args(args: argparse.Namespace) -> SimOptions:
    defects: dict[int, list[str]] = {}
    if args.all_defects:
        defects = sprinkle_defects(args.lights)
    for index, kinds in parse_defects(args.defects).items():
        merged = defects.setdefault(index, [])
        merged.extend(k for k in kinds if k not in merged)
    filters = tuple(f.strip() for f in str(args.filters).split(",") if f.strip())
    return SimOptions(
        out=Path(args.out),
        lights=args.lights,
        width=args.width,
        height=args.height,
        seed=args.seed,
        exptime=args.exptime,
        target=args.target,
        filters=filters or ("L",),
        filter_order=args.filter_order,
        osc=bool(args.osc),
        bayer=args.bayer,
        meridian_flip_at=args.flip_at,
        defects=defects,
        calibration=not args.no_calibration,
        n_bias=args.n_bias,
        n_darks=args.n_darks,
        n_flats=args.n_flats,
        temperature=args.temperature,
        interval=args.interval,
    )


def run_cli(args: argparse.Namespace) -> int:
    """Simulate from parsed arguments and print what was written; returns the exit code."""
    opts = options_from_args(args)
    written: list[Path] = []
    truth = simulate_session(opts, on_file=written.append)
    rel = [p.relative_to(opts.out).parts for p in written]
    kinds = Counter(parts[1] for parts in rel if parts[0] == "calibration")
    lights = len(truth["lights"])
    rejected = sum(1 for light in truth["lights"] if light["expected_status"] == "rejected")
    parts = [f"{lights} lights"]
    for name in ("bias", "darks", "flats"):
        if kinds.get(name):
            parts.append(f"{kinds[name]} {name}")
    print(f"wrote {len(written)} frames ({', '.join(parts)}) to {opts.out}")
    if rejected:
        print(f"{rejected} light(s) carry a defect that should get them rejected")
    print(
        f"truth: {Path(opts.out) / 'truth.json'}  noiseless reference: "
        f"{Path(opts.out) / 'truth_sky.fits'}"
    )
    return 0
