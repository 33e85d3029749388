"""The ``nas`` command. It owns the terminal: tables, progress bars and exit codes.

Exit codes: 0 success, 1 a check failed (export parity, INT8 agreement), 2 bad input (space file, arch, data,
run directory, a run directory in use by another process), 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nas
from nas import jsonio
from nas.run_dir import RunDir
from nas.run_lock import RunLock
from nas.search.samplers import SAMPLERS

logger = logging.getLogger("nas")

DEFAULT_SPACE = "digits_quick"


class UsageError(Exception):
    """Bad input on the command line; printed without a traceback, exit code 2."""


def _progress_factory():
    from tqdm import tqdm

    def make(total: int, description: str, initial: int) -> Any:
        return tqdm(total=total, initial=initial, desc=description, unit="step", dynamic_ncols=True, mininterval=0.5, file=sys.stderr)

    return make


def _load_config(space: str):
    from nas.space.schema import load_config

    return load_config(space)


def command_validate(args: argparse.Namespace) -> int:
    config = _load_config(args.space)
    space = config.space
    print(f"{args.space}: valid ({space.modality} space {space.name!r}, {len(space.stages)} stages, {space.count():,} subnets)")
    return 0


def command_space_list(args: argparse.Namespace) -> int:
    from nas.space.schema import builtin_spaces

    for name, path in sorted(builtin_spaces().items()):
        print(f"{name:20s} {path}")
    return 0


def command_space_info(args: argparse.Namespace) -> int:
    import numpy as np

    from nas.supernets.costs import space_costs

    config = _load_config(args.space)
    space = config.space
    costs = space_costs(space)
    sizes = "resolutions" if space.modality == "image" else "sequence lengths"
    print(f"space          {space.name} ({space.modality}, task {config.task.dataset})")
    print(f"subnets        {space.count():,}  (= {space.count()})")
    print(f"{sizes:14s} {list(space.input_sizes)}")
    print(f"parameters     {costs.min_params:,} .. {costs.max_params:,}")
    print(f"MACs           {costs.min_macs:,} .. {costs.max_macs:,}  (batch 1)")
    for index, stage in enumerate(space.stages):
        types = ", ".join(f"{choices.type} ({choices.count()})" for choices in stage.blocks)
        print(f"stage {index}        depth {list(stage.depths)} width {list(stage.widths)} stride {stage.stride}: {types}")
    arch = space.sample(np.random.default_rng(args.seed))
    print(f"sampled arch (seed {args.seed}):")
    print(jsonio.dumps(arch.to_dict(), indent=1))
    return 0


def command_train(args: argparse.Namespace) -> int:
    from nas.training.loop import train

    config = _load_config(args.space)
    args.held.enter_context(RunLock(Path(args.out)))
    _announce_ray_training(args.workers, args.address)
    result = train(config, Path(args.out), resume=args.resume, progress=_progress_factory(), workers=args.workers, address=args.address)
    _print_metrics(result.metrics)
    print(f"run directory: {result.run_dir}")
    return 0


def _announce_ray_training(workers: int, address: str | None) -> None:
    if workers > 1 or address:
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        print(f"training with {workers} Ray Train worker(s) on {where}; the bar advances an epoch at a time once they have started", file=sys.stderr)


def _print_metrics(metrics: dict[str, Any]) -> None:
    rows = [(name, metrics[name]) for name in ("largest", "smallest") if name in metrics]
    rows += [(f"{family} {size}", values[size]) for family, values in metrics.get("families", {}).items() for size in ("largest", "smallest")]
    for name, values in rows:
        print(f"{name:28s} val {values['val']:.4f}  test {values['test']:.4f}")


def command_export(args: argparse.Namespace) -> int:
    if args.sorted:
        return _export_sorted(args)
    if args.pareto or args.trial is not None:
        return _export_from_study(args)
    if not args.arch:
        raise UsageError("nas export needs --arch, --pareto, --trial N or --sorted")
    from nas.export.subnet import export_arch

    report = export_arch(Path(args.run_dir), args.arch, int8=args.int8, out=Path(args.out) if args.out else None)
    _print_export(report)
    return 0


def _export_from_study(args: argparse.Namespace) -> int:
    from nas.report.writers import export_fronts, export_trials, front_trials
    from nas.search.study import load_study

    run_dir = Path(args.run_dir)
    study = load_study(run_dir)
    if args.trial is not None:
        matching = [trial for trial in study.get_trials(deepcopy=False) if trial.number == args.trial and "arch" in trial.user_attrs]
        if not matching:
            raise UsageError(f"{run_dir} has no trial {args.trial} with an arch (trials: 0..{len(study.trials) - 1})")
        trials = matching
    else:
        trials = list(front_trials(study).values())
        if not trials:
            raise UsageError(f"{run_dir}: the search has no feasible completed trial yet")
    out_root = Path(args.out) if args.out else None
    if args.trial is not None:
        exports = export_trials(run_dir, trials, int8=args.int8, out_root=out_root, progress=_progress_factory())
    else:
        exports = export_fronts(run_dir, study, int8=args.int8, out_root=out_root, progress=_progress_factory())
    failures = 0
    for export in exports.values():
        if export.report is None:
            failures += 1
            print(f"trial {export.trial}: export failed: {export.error}", file=sys.stderr)
        else:
            _print_export(export.report)
    return 1 if failures else 0


def _export_sorted(args: argparse.Namespace) -> int:
    from nas.export.sorted import REPORT_FILE, SUMMARY_FILE, export_sorted

    result = export_sorted(Path(args.run_dir), int8=args.int8, out=Path(args.out) if args.out else None, progress=_progress_factory())
    for member in result.summary["members"]:
        latency = member["latency_ms"]
        share = member["share_of_largest"]
        print(
            f"  m{member['index']:02d} t={member['t']:.3f}  {member['arch_name']:28s} {member['params']:>12,} params  "
            f"test acc {member['onnx_test_accuracy']:.4f} ({'-' if share is None else f'{share:.1%}'} of the largest)  "
            f"{latency['median_ms']:.4g} ms (p10 {latency['p10_ms']:.4g}, cv {latency['cv']:.1%})"
        )
    mean = result.summary["mean_share_of_smaller"]
    print(f"wrote {len(result.members)} members to {result.out_dir}; the smaller ones keep {'-' if mean is None else f'{mean:.1%}'} of the largest's accuracy")
    for member in result.members:
        if member.report.int8_error:
            print(f"  m{member.index:02d}: INT8 left out: {member.report.int8_error}")
    print(f"report: {result.out_dir / REPORT_FILE}  summary: {result.out_dir / SUMMARY_FILE}")
    return 0


def _print_export(report: Any) -> None:
    result = report.export
    print(f"wrote {result.path}  (test accuracy {report.test_accuracy:.4f}; ONNX Runtime vs PyTorch max abs error {result.max_abs_error:.2e})")
    if result.int8_path is not None:
        print(f"wrote {result.int8_path}  (INT8 top-1 agreement with fp32 on the validation split {result.int8_top1_agreement:.2%})")
    if getattr(report, "int8_error", None):
        print(f"  INT8 left out: {report.int8_error}")


def command_run(args: argparse.Namespace) -> int:
    import time

    from nas.report.writers import export_fronts, front_trials, op_type_comparison, write_outputs
    from nas.search.loop import run_search
    from nas.search.settings import SearchSettings
    from nas.training.loop import train

    config = _load_config(args.space)
    out = Path(args.out) if args.out else Path("runs") / config.space.name
    targets = tuple(name.strip() for name in args.targets.split(",")) if args.targets else None
    profiles = None
    if args.profile:
        from nas.predictors.profile import profile_targets

        profiles = tuple(sorted({**dict(config.search.profiles), **profile_targets(args.profile)}.items()))
    settings = SearchSettings.from_config(
        config.search,
        trials=args.trials,
        sampler=args.sampler,
        targets=targets,
        workers=args.workers,
        address=args.address,
        seed=args.seed,
        latency=args.latency,
        profiles=profiles,
    )
    if args.profile and settings.latency != "predicted":
        raise UsageError("--profile is used only with --latency predicted (or search.latency: predicted in the space file)")
    if settings.latency == "predicted":
        from nas.search.loop import latency_predictors

        latency_predictors(config.space, settings)
    args.held.enter_context(RunLock(out))
    elapsed: dict[str, float] = {}
    started = time.perf_counter()
    resume = args.resume or RunDir(out).checkpoint.exists()
    print(f"[1/3] supernet: {config.space.name} ({config.space.count():,} subnets) in {out}", file=sys.stderr)
    _announce_ray_training(args.workers or 1, args.address)
    result = train(config, out, resume=resume, progress=_progress_factory(), workers=args.workers or 1, address=args.address)
    _print_metrics(result.metrics)
    elapsed["training"] = time.perf_counter() - started
    where = f"Ray cluster {args.address}" if args.address else (f"{settings.workers} local Ray workers" if settings.workers > 1 else "in process")
    print(f"[2/3] search: {settings.trials} archs, {settings.sampler}, targets {', '.join(settings.targets)}, {where}", file=sys.stderr)
    started = time.perf_counter()
    search = run_search(out, settings, resume=args.resume or RunDir(out).search.exists(), progress=_progress_factory())
    elapsed["search"] = time.perf_counter() - started
    front = list(front_trials(search.study).values())
    print(f"[3/3] export: {len(front)} front member(s) to {out / 'pareto'}", file=sys.stderr)
    started = time.perf_counter()
    exports = export_fronts(out, search.study, int8=not args.no_int8, progress=_progress_factory()) if not args.no_export else {}
    cpu_targets = {"cpu_fp32", "cpu_int8"} <= set(settings.targets)
    op_types = op_type_comparison(list(exports.values())) if exports and cpu_targets and not args.no_int8 else []
    elapsed["export"] = time.perf_counter() - started
    summary = write_outputs(out, search.study, exports, space_name=config.space.name, op_types=op_types, elapsed=elapsed)
    for name, front_summary in summary["fronts"].items():
        print(f"front on {name}: {len(front_summary['members'])} archs")
        for member in front_summary["members"]:
            latency = member["latency_ms"][name]
            figure = (
                f"{latency['median_ms']:.4g} ms predicted ({latency.get('statistic', 'median')}, {latency.get('predictor')})"
                if latency.get("predicted")
                else f"{latency['median_ms']:.4g} ms (p10 {latency['p10_ms']:.4g}, cv {latency['cv']:.1%})"
            )
            print(f"  trial {member['trial']:4d}  {member['arch_name']:28s} val acc {member['val_accuracy']:.4f}  {figure}")
    check = jsonio.loads(RunDir(out).front_check.read_text()) if settings.latency == "predicted" and RunDir(out).front_check.exists() else None
    for name, rows in (check or {}).get("targets", {}).items():
        for row in rows:
            if row["breaks_limit"]:
                print(f"warning: front on {name}: trial {row['trial']} was predicted at {row['predicted_ms']:.4g} ms but measured above {row['limit_ms']:g} ms")
    print(f"report: {out / 'report.md'}  plot: {out / 'pareto.png'}  trials: {out / 'trials.csv'}")
    return 0


def command_profile(args: argparse.Namespace) -> int:
    from nas.latency.fingerprint import fingerprint_key
    from nas.predictors.profile import DEFAULT_ROOT, ProfileSettings, build_profile, check_profile, load_profile, profile_fingerprint, quality_table

    config = _load_config(args.space)
    space = config.space
    settings = ProfileSettings(
        target=args.target, budget=args.budget, seed=args.seed, threads=args.threads, batch_size=args.batch_size, measure_seconds=args.measure_seconds
    )
    if args.minutes is not None and not args.minutes > 0:
        raise UsageError(f"--minutes must be > 0, got {args.minutes}")
    fingerprint = profile_fingerprint(settings)
    out = Path(args.out) if args.out else Path(DEFAULT_ROOT) / space.name / f"{args.target}-{fingerprint_key(fingerprint)}"
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a profile folder")
    if args.check is not None:
        if args.check < 2:
            raise UsageError(f"--check needs at least 2 fresh archs, got {args.check}")
        profile = load_profile(out, space, fingerprint=fingerprint)
        result = check_profile(profile, settings, count=args.check, progress=_progress_factory())
        print(f"check of {out}: {result['archs']} fresh archs measured twice ({result['cost']['minutes']} min)")
        print("\n".join(quality_table(result["predictors"], result["noise_floor"])))
        return 0
    print(f"profile: {space.name} on {args.target} into {out}", file=sys.stderr)
    try:
        result = build_profile(space, settings, out, minutes=args.minutes, statistic=args.statistic, progress=_progress_factory())
    except KeyboardInterrupt:
        print(f"\ninterrupted; every measurement taken is kept in {out}: rerun the same command to continue", file=sys.stderr)
        return 130
    print((out / "quality.md").read_text())
    if not result.complete:
        print(f"incomplete: {result.measured_total} of {result.planned_total} measured; rerun the same command to continue", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nas", description="nasforge: hardware-aware neural architecture search")
    parser.add_argument("--version", action="version", version=f"nasforge {nas.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True)

    validate = commands.add_parser("validate", help="check a search-space file and report every problem")
    validate.add_argument("space", help="path to a YAML file or the name of a built-in space")
    validate.set_defaults(handler=command_validate)

    space = commands.add_parser("space", help="inspect search spaces").add_subparsers(dest="space_command", required=True)
    info = space.add_parser("info", help="subnet count, parameter and MAC range, a sampled arch")
    info.add_argument("space")
    info.add_argument("--seed", type=int, default=0)
    info.set_defaults(handler=command_space_info)
    listing = space.add_parser("list", help="built-in spaces")
    listing.set_defaults(handler=command_space_list)

    train = commands.add_parser("train", help="train the supernet of a space")
    train.add_argument("space")
    train.add_argument("--out", required=True, help="run directory")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    train.add_argument("--workers", type=int, default=1, help="data-parallel training workers (default 1: in process, no Ray; N > 1: Ray Train, N workers)")
    train.add_argument("--address", help="train on an existing Ray cluster ('auto' or HOST:PORT); --out must be on storage every node sees")
    train.set_defaults(handler=command_train)

    export = commands.add_parser("export", help="export subnets of a trained (and searched) run to ONNX")
    export.add_argument("run_dir")
    which = export.add_mutually_exclusive_group()
    which.add_argument("--arch", help="'largest', 'smallest', arch JSON, or a .json/.yaml file")
    which.add_argument("--pareto", action="store_true", help="every member of the search's fronts (to RUN_DIR/pareto)")
    which.add_argument("--trial", type=int, help="the arch of one search trial")
    which.add_argument("--sorted", action="store_true", help="every member of a sorted-strategy run's nested family (to RUN_DIR/sorted)")
    export.add_argument("--int8", action="store_true", help="also write a static-QDQ INT8 model")
    export.add_argument("--out", help="output folder (default RUN_DIR/exports/<arch>, RUN_DIR/pareto or RUN_DIR/sorted)")
    export.set_defaults(handler=command_export)

    run = commands.add_parser("run", help="train (or reuse) the supernet, search the accuracy-latency front, export it")
    run.add_argument("space", nargs="?", default=DEFAULT_SPACE, help=f"default: the embedded {DEFAULT_SPACE}")
    run.add_argument("--out", help="run directory (default runs/<space name>)")
    run.add_argument("--resume", action="store_true", help="continue a killed or interrupted run")
    run.add_argument("--workers", type=int, help="evaluators (default 1: in process, no Ray; N > 1: N local Ray actors)")
    run.add_argument("--address", help="join an existing Ray cluster ('auto' or HOST:PORT)")
    run.add_argument("--trials", type=int, help="distinct archs to evaluate (default: the space file's search.trials)")
    run.add_argument("--sampler", help=f"{', '.join(SAMPLERS.names())} (default: search.sampler)")
    run.add_argument("--targets", help="comma-separated latency targets, e.g. cpu_fp32,cpu_int8 (default: search.targets)")
    run.add_argument("--seed", type=int, help="sampler seed (default: search.seed)")
    run.add_argument("--latency", choices=("measured", "predicted"), help="measure every arch, or predict from a hardware profile (default: search.latency)")
    run.add_argument("--profile", action="append", metavar="DIR", help="hardware profile folder for --latency predicted (repeatable, one per target)")
    run.add_argument("--no-int8", action="store_true", help="skip the INT8 export of the front")
    run.add_argument("--no-export", action="store_true", help="search only; export later with `nas export RUN --pareto`")
    run.set_defaults(handler=command_run)

    profile = commands.add_parser("profile", help="measure a hardware profile of a space and fit latency predictors on it")
    profile.add_argument("space", help="path to a YAML file or the name of a built-in space")
    profile.add_argument("--target", required=True, help="latency target, e.g. cpu_fp32, cpu_int8, cuda_fp32, tensorrt_fp16")
    profile.add_argument("--budget", type=int, default=200, help="subnets in the designed sample (default 200; a fifth are held out)")
    profile.add_argument("--minutes", type=float, help="stop measuring after this long (a rerun continues)")
    profile.add_argument("--out", help="profile folder (default profiles/<space>/<target>-<device key>)")
    profile.add_argument("--seed", type=int, default=0, help="sample seed (default 0)")
    profile.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1)")
    profile.add_argument("--batch-size", type=int, default=1, help="batch size measured (default 1)")
    profile.add_argument("--measure-seconds", type=float, default=0.5, help="measuring time per model (default 0.5)")
    profile.add_argument("--statistic", choices=("p10", "median"), help="what the predictors predict (default: the profile's own, else p10)")
    profile.add_argument("--check", type=int, nargs="?", const=20, metavar="N", help="measure N (default 20) fresh archs against the profile's predictors")
    profile.set_defaults(handler=command_profile)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns its exit code. A command that writes into a run folder holds that folder's lock for
    its whole length by entering it into ``args.held`` (an ``ExitStack`` closed when the command returns); a folder
    another process holds is refused at once (exit 2, naming the holder)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("nas.plugins").setLevel(logging.INFO)
    from nas.data.splits import DataError
    from nas.export.onnx import ExportError
    from nas.latency.targets import LatencyError
    from nas.predictors.base import PredictorError
    from nas.ray_connect import RayConnectError
    from nas.run_lock import RunBusyError
    from nas.search.evaluators import EvaluatorStartError
    from nas.search.journal import JournalError
    from nas.space.schema import ConfigError
    from nas.supernets.space import ArchError
    from nas.supernets.strategies import StrategyError
    from nas.training.loop import RunError

    try:
        with contextlib.ExitStack() as held:
            args.held = held
            return args.handler(args)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (
        DataError,
        ArchError,
        RunError,
        UsageError,
        LatencyError,
        EvaluatorStartError,
        RunBusyError,
        JournalError,
        StrategyError,
        PredictorError,
        RayConnectError,
    ) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ExportError as error:
        print(f"export check failed: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; completed epochs and trials are saved: rerun with --resume to continue", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of stdout went away (`nas space info X | head`): stop quietly, as Unix tools do, and keep the
        # interpreter from failing again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
