"""The ``subwatch`` command: run, demo, simulate, check-config, enhance.

Flags override the config file, and ``run`` works with flags alone. Expected failures (a bad
config, a missing folder) end with one clear line on stderr and a non-zero exit, never a
traceback.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from subwatch import __version__
from subwatch.config import Config, ConfigError, apply_overrides, load_config

if TYPE_CHECKING:
    from subwatch.service.daemon import RunSummary

log = logging.getLogger("subwatch")

EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_RUNTIME = 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="subwatch",
        description="Live calibration, quality control and stacking of astrophotography subs.",
    )
    parser.add_argument("--version", action="version", version=f"subwatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="watch a capture folder and stack every new sub",
        description="The daemon: watch a folder, calibrate, judge, register and stack.",
    )
    run.add_argument("--config", type=Path, help="YAML config file (see config/subwatch.yaml)")
    run.add_argument("--watch", type=Path, help="capture folder to watch (read only)")
    run.add_argument("--output", type=Path, help="folder for stacks, previews and frames.jsonl")
    run.add_argument("--calibration", type=Path, help="calibration library folder")
    run.add_argument(
        "--http", metavar="HOST:PORT", help="listen address of the web page and metrics"
    )
    run.add_argument(
        "--once",
        action="store_true",
        help="process every frame already in the watch folder, write the results, exit 0",
    )
    run.add_argument(
        "--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="override logging.level"
    )
    run.add_argument("--log-format", choices=["text", "json"], help="override logging.format")

    demo = sub.add_parser(
        "demo",
        help="simulate a night and stack it live",
        description="Simulates a capture session into a folder while the daemon processes it.",
    )
    demo.add_argument(
        "--out",
        type=Path,
        default=Path("subwatch-demo"),
        help="demo folder (default ./subwatch-demo)",
    )
    demo.add_argument("--frames", type=int, default=16, help="number of lights (default 16)")
    demo.add_argument(
        "--interval", type=float, default=2.0, help="seconds between lights (default 2)"
    )
    demo.add_argument("--width", type=int, default=1024)
    demo.add_argument("--height", type=int, default=768)
    demo.add_argument("--seed", type=int, default=7)

    from subwatch import simulate

    sim = sub.add_parser(
        "simulate",
        help="write a synthetic session with truth.json",
        description="Writes lights, bias, darks, flats and truth.json for a simulated night.",
    )
    simulate.add_arguments(sim)

    check = sub.add_parser(
        "check-config",
        help="validate a config file",
        description="Validates a config file; errors name the key, the value and what is allowed.",
    )
    check.add_argument("file", type=Path)
    check.add_argument("--print", action="store_true", help="print the effective config")

    enhance = sub.add_parser(
        "enhance",
        help="gradient, SNR, PSF, deconvolution and stretched previews of a linear FITS",
        description="The preview pipeline on any linear FITS (a stack from subwatch, Siril or"
        " PixInsight); products go to OUT/<target>/<filter>/.",
    )
    enhance.add_argument("stack", type=Path, help="a linear FITS image (a stack)")
    enhance.add_argument("--out", type=Path, required=True, help="folder for the products")
    enhance.add_argument(
        "--config", type=Path, help="YAML config: its previews, deconvolution, denoise sections"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        if args.command == "run":
            return _cmd_run(args)
        if args.command == "demo":
            return _cmd_demo(args)
        if args.command == "simulate":
            from subwatch import simulate

            return simulate.run_cli(args)
        if args.command == "check-config":
            return _cmd_check(args)
        if args.command == "enhance":
            from subwatch.enhance import cli as enhance_cli

            return enhance_cli.run_cli(args)
    except ConfigError as exc:
        print(f"subwatch: config error:\n{exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (FileNotFoundError, NotADirectoryError, ValueError) as exc:
        print(f"subwatch: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        return 130
    parser.error(f"unknown command {args.command}")
    return EXIT_USAGE


def _cmd_check(args: argparse.Namespace) -> int:
    cfg = load_config(args.file)
    if args.print:
        from subwatch.config import render_config_yaml

        print(render_config_yaml(cfg))
    print(f"{args.file}: ok")
    return 0


def _load(args: argparse.Namespace) -> Config:
    cfg = load_config(args.config)
    cfg = apply_overrides(
        cfg, watch=args.watch, output=args.output, calibration=args.calibration, http=args.http
    )
    if args.log_level or args.log_format:
        cfg = cfg.model_copy(
            update={
                "logging": cfg.logging.model_copy(
                    update={
                        k: v
                        for k, v in (("level", args.log_level), ("format", args.log_format))
                        if v
                    }
                )
            }
        )
    return cfg


def _install_signals(stop: Callable[[], None], reload: Callable[[], None] | None = None) -> None:
    """SIGTERM and SIGINT finish the current frame and stop; SIGHUP re-reads the config.

    Handlers only set flags: the worker acts on them between frames.
    """

    def on_stop(signum: int, _frame: object) -> None:
        log.info("signal %s: finishing the current frame and stopping", signal.Signals(signum).name)
        stop()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    if reload is not None:

        def on_hup(_signum: int, _frame: object) -> None:
            log.info("signal SIGHUP: reloading the config")
            reload()

        signal.signal(signal.SIGHUP, on_hup)


def _cmd_run(args: argparse.Namespace) -> int:
    from subwatch.service.daemon import Daemon
    from subwatch.service.logs import setup_logging

    cfg = _load(args)
    setup_logging(cfg.logging.level, cfg.logging.format)
    if cfg.watch.path is None:
        print(
            "subwatch: no watch folder: give --watch DIR or set watch.path in the config",
            file=sys.stderr,
        )
        return EXIT_USAGE
    # --once serves HTTP only when asked with --http; a watching daemon as http.enabled says.
    serve = True if args.http else (False if args.once else None)
    daemon = Daemon(
        cfg,
        once=args.once,
        reload_config=(lambda: _load(args)) if args.config else None,
        serve_http=serve,
    )
    _install_signals(daemon.request_stop, daemon.request_reload)
    summary = daemon.run()
    print(_summary_text(summary))
    return 0


def _summary_text(summary: RunSummary) -> str:
    counts = ", ".join(f"{k} {v}" for k, v in summary.counts.items() if v) or "nothing"
    stacks = ", ".join(f"{k}: {v} subs" for k, v in summary.stacks.items()) or "none"
    return f"{summary.processed} files ({counts}); stacks: {stacks}; output: {summary.output}"


def _cmd_demo(args: argparse.Namespace) -> int:
    from subwatch.service.demo import run_demo
    from subwatch.service.logs import setup_logging

    setup_logging("WARNING", "text")  # the demo prints its own progress
    stop = threading.Event()
    _install_signals(stop.set)
    return run_demo(
        args.out,
        frames=args.frames,
        interval=args.interval,
        width=args.width,
        height=args.height,
        seed=args.seed,
        stop=stop,
    )


if __name__ == "__main__":
    sys.exit(main())
