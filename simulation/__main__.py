"""``python -m simulation`` (also ``flwr-invariant-sim``): run, grid, report, frontier, scorecard, compare.

    python -m simulation run --set task=linear defense=invariant --out runs/one
    python -m simulation run --from runs/one/config.json          # repeat a run
    python -m simulation grid configs/fmnist_defenses.toml
    python -m simulation report results/fmnist
    python -m simulation frontier results/long_horizon_fmnist results/screen --out results/frontier
    python -m simulation scorecard results/long_horizon_fmnist --defense "invariant tau=0.3"
    python -m simulation compare --task linear --rounds 30 --seeds 0 1 2

Resource flags (run, grid): --cpus-per-client, --gpus-per-client (a share of
one GPU such as 0.25, or "auto"), --concurrency, --ray-address, --allow-cpu-fallback.
Each run goes through a local Flower SuperLink (:mod:`simulation.launcher`); Flower's
log of a run is in RUN_DIR/flower.log, and on stderr too with --verbose.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

__all__ = ["main"]


def _add_resource_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("client resources (Ray)")
    group.add_argument("--cpus-per-client", type=int, help="whole CPUs per virtual client (default 1)")
    group.add_argument(
        "--gpus-per-client", help="share of one GPU per client, e.g. 0.25, or 'auto' (default 0)"
    )
    group.add_argument(
        "--concurrency", type=int, help="with --gpus-per-client auto: clients at once over all GPUs"
    )
    group.add_argument(
        "--ray-address", help="attach to a running Ray cluster, e.g. 'auto' or 'ray://head:10001'"
    )
    group.add_argument("--allow-cpu-fallback", action="store_true", help="use the CPU when no GPU is visible")
    parser.add_argument("--verbose", action="store_true", help="print Flower's log of each run to stderr")


def _resources(args: argparse.Namespace, base: Any = None) -> Any:
    from .launcher import Resources

    resources = base or Resources()
    given = {
        "cpus_per_client": args.cpus_per_client,
        "gpus_per_client": None if args.gpus_per_client is None else _share(args.gpus_per_client),
        "concurrency": args.concurrency,
        "ray_address": args.ray_address,
        "allow_cpu_fallback": args.allow_cpu_fallback or None,
    }
    return replace(resources, **{k: v for k, v in given.items() if v is not None})


def _share(text: str) -> float | str:
    return text if text == "auto" else float(text)


def _run(args: argparse.Namespace) -> None:
    from .compare import parse_sets
    from .config import DEFAULTS, resolve_config
    from .data import check_task_files
    from .grid import check_writable, resources_from, run_into

    overrides: dict[str, Any] = {}
    resources = None
    if args.source:
        saved = json.loads(Path(args.source).read_text())
        overrides, resources = saved["overrides"], resources_from(saved["resources"], args.source)
    overrides.update(parse_sets(args.set))
    unknown = sorted(set(overrides) - set(DEFAULTS))
    if unknown:
        raise SystemExit(f"unknown run-config key(s) {unknown} (see simulation/config.py)")
    check_task_files(resolve_config(overrides))  # a bad value or missing file fails here, before any output
    out = Path(args.out)
    check_writable(out)
    record = run_into(out, overrides, _resources(args, resources), verbose=args.verbose)
    last = record["rounds"][-1]
    print(
        f"{out}: round {last['round']} acc_main {last['acc_main']:.4f} "
        f"acc_backdoor {last['acc_backdoor']:.4f}"
    )


def _grid(args: argparse.Namespace) -> None:
    from .grid import load_grid, run_grid

    spec = load_grid(args.config)
    if args.output:
        spec.output = Path(args.output)
    spec.resources = _resources(args, spec.resources)
    run_dirs = run_grid(spec, progress=not args.no_progress, verbose=args.verbose)
    print(f"{len(run_dirs)} runs in {spec.output}; report: python -m simulation report {spec.output}")


def _report(args: argparse.Namespace) -> None:
    from .report import write_report

    files = write_report(Path(args.results), Path(args.out) if args.out else None)
    print(f"wrote {files.markdown}, {files.csv} and {len(files.plots)} plots")
    print(files.markdown.read_text())
    if files.skipped:
        print(f"skipped {len(files.skipped)} run(s): {', '.join(files.skipped)}", file=sys.stderr)


def _frontier(args: argparse.Namespace) -> None:
    from .frontier import write_frontier

    written = write_frontier([Path(d) for d in args.results], Path(args.out))
    print(f"wrote {', '.join(map(str, written))}")
    print(written[0].read_text())


def _scorecard(args: argparse.Namespace) -> None:
    from .scorecard import write_scorecard

    print(
        write_scorecard(
            [Path(d) for d in args.results], args.defense, args.baseline, Path(args.out) if args.out else None
        )
    )


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m simulation", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    run_parser = commands.add_parser("run", help="one experiment into a run directory")
    run_parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="run-config keys")
    run_parser.add_argument("--from", dest="source", help="repeat the run of this config.json")
    run_parser.add_argument("--out", default="runs/latest", help="run directory (default runs/latest)")
    _add_resource_flags(run_parser)

    grid_parser = commands.add_parser("grid", help="defenses x attacks x seeds from a TOML/YAML file")
    grid_parser.add_argument("config")
    grid_parser.add_argument("--output", help="results directory (overrides the file's 'output')")
    grid_parser.add_argument("--no-progress", action="store_true")
    _add_resource_flags(grid_parser)

    report_parser = commands.add_parser(
        "report", help="Markdown/CSV table and PNG plots of a results directory"
    )
    report_parser.add_argument("results")
    report_parser.add_argument("--out", help="where to write (default: the results directory)")

    frontier_parser = commands.add_parser(
        "frontier", help="final acc_main vs highest acc_backdoor of any round, from results directories"
    )
    frontier_parser.add_argument("results", nargs="+")
    frontier_parser.add_argument("--out", required=True, help="directory for frontier.md and the plots")

    scorecard_parser = commands.add_parser(
        "scorecard", help="a defense's cells against the long-horizon bar, next to the baseline's runs"
    )
    scorecard_parser.add_argument("results", nargs="+")
    scorecard_parser.add_argument(
        "--defense", required=True, help='label as the report writes it, e.g. "invariant tau=0.3"'
    )
    scorecard_parser.add_argument(
        "--baseline", default="fedavg", help="defense label to compare with (default fedavg)"
    )
    scorecard_parser.add_argument("--out", help="also write the Markdown to this file")

    commands.add_parser(
        "compare", help="FedAvg vs InvariantAggregation table (see simulation.compare)", add_help=False
    )

    args, rest = parser.parse_known_args(argv)
    from .superlink import exit_on_sigterm

    exit_on_sigterm()
    if args.command == "compare":
        from .compare import main as compare_main

        compare_main(rest)
        return
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        {"run": _run, "grid": _grid, "report": _report, "frontier": _frontier, "scorecard": _scorecard}[
            args.command
        ](args)
    except (ValueError, PermissionError, FileNotFoundError, RuntimeError) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
