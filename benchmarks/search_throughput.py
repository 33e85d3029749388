"""Search-phase throughput with N workers vs one, side by side, and the per-trial scheduling overhead.

    python benchmarks/search_throughput.py [--run runs/digits_quick] [--trials 24] [--rounds 2] [--workers 2]
                                           [--latency predicted [--profile DIR]]

Throughput: the trained run's study is searched from scratch ``--rounds`` times with ``--workers 1`` (in process)
and ``--workers N`` (local Ray actors), alternating which goes first; each search evaluates ``--trials`` distinct
archs of the real space with real latency measurement. Distinct archs per second are counted from the moment the
evaluators are ready (pool start-up, Ray's included, is reported separately). The ratio is taken per round.

With ``--latency predicted`` each search reads latency from the hardware profile (``--profile``, default: the one
found for this device) and measures only its fronts at the end; archs per second count the search loop, the
front's measurement is reported beside it.

Scheduling overhead: the same loop with an evaluator that returns a prepared result at once and a measurement
that returns a fixed figure, so what remains per trial is ask, dispatch, result, tell and the journal write.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from nas.search.evaluators import Evaluation, EvaluatorPayload
from nas.search.loop import SearchSettings, run_search
from nas.space.schema import load_config
from nas.training.loop import train


class InstantEvaluator:
    """Returns a prepared evaluation immediately (no model work): isolates the scheduling cost."""

    def __init__(self, payload: EvaluatorPayload) -> None:
        self.worker = "instant"

    def evaluate(self, arch_json: str) -> Evaluation:
        return Evaluation(arch_json, 0.5, 1000, 1000, {"fp32": b"", "int8": b""}, None, 0.0, self.worker)


def instant_measure(models: dict[tuple[str, str], bytes]) -> dict[tuple[str, str], dict]:
    return {
        key: {"median_ms": 1.0 + len(key[0]) * 1e-6, "p10_ms": 1.0, "p90_ms": 1.0, "cv": 0.0, "samples": 1, "stable": True, "seconds": 0.0, "fingerprint": {}}
        for key in models
    }


def search_once(trained: Path, workers: int, trials: int, overrides: dict | None = None, **kwargs) -> tuple[float, float, float, float, float]:
    """Of one fresh search of ``trained``: distinct archs per second after start-up (the fronts' measurement of a
    predicted-latency search left out), start-up seconds, the seconds spent in the evaluation and in the
    measurement phases, and the seconds of the fronts' measurement."""
    with tempfile.TemporaryDirectory(prefix="nasforge-bench-") as folder:
        run_dir = Path(folder) / "run"
        shutil.copytree(trained, run_dir, ignore=shutil.ignore_patterns("search", "pareto", "exports"))
        config = load_config(run_dir / "config.yaml")
        settings = SearchSettings.from_config(config.search, trials=trials, workers=workers, **(overrides or {}))
        result = run_search(run_dir, settings, **kwargs)
        loop = result.seconds - result.startup_seconds - result.front_check_seconds
        return result.evaluated / loop, result.startup_seconds, result.evaluation_seconds, result.measurement_seconds, result.front_check_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="benchmarks/runs/digits_quick", help="trained run directory (trained here if missing)")
    parser.add_argument("--space", default="digits_quick")
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--overhead-trials", type=int, default=200)
    parser.add_argument("--latency", choices=("measured", "predicted"), default="measured")
    parser.add_argument("--profile", action="append", help="hardware profile folder per target (--latency predicted; default: found by device)")
    args = parser.parse_args()
    overrides: dict = {"latency": args.latency}
    if args.profile:
        from nas.predictors.profile import profile_targets

        overrides["profiles"] = tuple(sorted(profile_targets(args.profile).items()))
    trained = Path(args.run)
    if not (trained / "metrics.json").exists():
        print(f"training {args.space} into {trained} ...")
        train(load_config(args.space), trained, resume=(trained / "checkpoint").exists())

    ratios, single, multi, startups = [], [], [], {1: [], args.workers: []}
    phases: dict[int, list[tuple[float, float]]] = {1: [], args.workers: []}
    checks: dict[int, list[float]] = {1: [], args.workers: []}
    for round_index in range(args.rounds):
        order = (1, args.workers) if round_index % 2 == 0 else (args.workers, 1)
        rates = {}
        for workers in order:
            rate, startup, evaluation, measurement, check = search_once(trained, workers, args.trials, overrides)
            rates[workers] = rate
            startups[workers].append(startup)
            phases[workers].append((evaluation, measurement))
            checks[workers].append(check)
            print(
                f"round {round_index + 1}: workers {workers}: {rate:.3f} archs/s (start-up {startup:.1f} s, "
                f"evaluation {evaluation:.1f} s, measurement {measurement:.1f} s, front check {check:.1f} s)"
            )
        single.append(rates[1])
        multi.append(rates[args.workers])
        ratios.append(rates[args.workers] / rates[1])

    overhead = {}
    for workers in (1, args.workers):
        rate, *_ = search_once(trained, workers, args.overhead_trials, factory=InstantEvaluator, measure=instant_measure)  # measured latency
        overhead[workers] = 1.0 / rate

    print()
    print(
        f"machine: {platform.processor() or platform.machine()}, {platform.system()}; space {args.space}; "
        f"{args.trials} archs per search; latency {args.latency}; {time.strftime('%Y-%m-%d')}"
    )
    print()
    print(f"| measure | workers 1 | workers {args.workers} | ratio |")
    print("|---|---|---|---|")
    print(
        f"| distinct archs / s (median of {args.rounds} rounds) | {statistics.median(single):.3f} | {statistics.median(multi):.3f} | "
        f"{statistics.median(ratios):.2f}x [{min(ratios):.2f}, {max(ratios):.2f}] |"
    )
    evaluation = {workers: statistics.median(args.trials / phase[0] for phase in values) for workers, values in phases.items()}
    measurement = {workers: statistics.median(phase[1] / args.trials for phase in values) for workers, values in phases.items()}
    print(f"| evaluation phase only, archs / s | {evaluation[1]:.3f} | {evaluation[args.workers]:.3f} | {evaluation[args.workers] / evaluation[1]:.2f}x |")
    print(f"| measurement phase (serial by design), s per arch | {measurement[1]:.3f} | {measurement[args.workers]:.3f} | |")
    if args.latency == "predicted":
        print(f"| fronts measured after the search, s | {statistics.median(checks[1]):.1f} | {statistics.median(checks[args.workers]):.1f} | |")
    print(f"| start-up (load data, build evaluators), s | {statistics.median(startups[1]):.1f} | {statistics.median(startups[args.workers]):.1f} | |")
    print(f"| scheduling overhead per trial, s ({args.overhead_trials} instant trials) | {overhead[1]:.4f} | {overhead[args.workers]:.4f} | |")


if __name__ == "__main__":
    main()
