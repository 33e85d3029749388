"""Search with both objectives predicted, then the front verified by real evaluation and measurement.

    python benchmarks/predicted_search.py --run RUN_DIR --profile PROFILE_DIR [--trials 3000] [--limits 0.04,0.06,0.08]

``RUN_DIR`` is a trained and searched run (its distinct trials' inherited accuracies train the accuracy predictor,
``nas.predictors.accuracy``; a fifth are held out for its Kendall tau); ``PROFILE_DIR`` a hardware profile of the
same space on this device (its best latency predictor). Regularised evolution (the ``evolution`` sampler, Optuna,
in memory) then proposes ``--trials`` archs scored only by the two predictors, a batch of archs at a time. For each
latency limit the arch of highest predicted accuracy whose predicted latency is within the limit is chosen, and
verified: inherited accuracy evaluated for real (BN recalibrated, exported fp32 ONNX scored on the validation split,
exactly what a measured search records) and latency measured with the protocol (interleaved). Baselines beside it:
the best arch within each limit among as many random archs as the evolution proposed (same predictors), and the
best real trial of the searched run within the limit (what the measured search found). Reported: search seconds,
archs per second, and per limit predicted vs real accuracy and latency, and whether the real latency meets it.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import optuna

from nas.data.tasks import load_task_data
from nas.latency.protocol import measure_latency
from nas.latency.targets import resolve_target
from nas.predictors.accuracy import AccuracyPredictor, run_accuracy_pairs
from nas.predictors.profile import ProfileSettings, load_profile, profile_fingerprint, read_header
from nas.search.encoding import suggest_arch
from nas.search.evaluators import Evaluator
from nas.search.loop import build_payload
from nas.search.samplers import make_sampler
from nas.search.settings import SearchSettings
from nas.supernets.space import Arch
from nas.training.loop import load_run

BATCH = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--profile", type=Path, required=True)
    parser.add_argument("--trials", type=int, default=3000)
    parser.add_argument(
        "--limits",
        default="",
        help="comma-separated latency limits in ms (default: 10, 30 and 60%% of the way from the fastest to the slowest latency of the profile)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "predicted_search.json")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    config, supernet, _ = load_run(args.run)
    space = config.space
    target = read_header(args.profile)["settings"]["target"]
    profile = load_profile(args.profile, space, fingerprint=profile_fingerprint(ProfileSettings(target=target)))
    latency = profile.predictor()
    archs, accuracies = run_accuracy_pairs(args.run, space)
    order = np.random.default_rng(args.seed).permutation(len(archs))
    held = order[: len(archs) // 5]
    fit = order[len(archs) // 5 :]
    accuracy = AccuracyPredictor(space, seed=args.seed).fit([archs[index] for index in fit], accuracies[fit])
    held_quality = accuracy.quality([archs[index] for index in held], accuracies[held])
    accuracy = AccuracyPredictor(space, seed=args.seed).fit(archs, accuracies)

    quality = json.loads((args.profile / "quality.json").read_text())
    if args.limits:
        limits = [float(value) for value in args.limits.split(",")]
    else:
        low, high = quality["latency_range_ms"]
        limits = [round(low + fraction * (high - low), 4) for fraction in (0.1, 0.3, 0.6)]

    started = time.perf_counter()
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=make_sampler("evolution", seed=args.seed, population_size=32, walk=space.walk()))
    proposed: dict[Arch, tuple[float, float]] = {}
    while len(study.trials) < args.trials:
        trials = [study.ask() for _ in range(min(BATCH, args.trials - len(study.trials)))]
        batch = [suggest_arch(trial, space) for trial in trials]
        predicted_accuracy = accuracy.predict(batch)
        predicted_latency = latency.predict(batch)
        for trial, arch, value, ms in zip(trials, batch, predicted_accuracy.tolist(), predicted_latency.tolist(), strict=True):
            proposed[arch] = (value, ms)
            study.tell(trial, [value, ms])
    search_seconds = time.perf_counter() - started

    rng = np.random.default_rng(args.seed + 1)
    random_archs = list(dict.fromkeys(space.sample(rng) for _ in range(args.trials)))
    random_scores = dict(zip(random_archs, zip(accuracy.predict(random_archs).tolist(), latency.predict(random_archs).tolist(), strict=True), strict=True))

    def best_within(scores: dict[Arch, tuple[float, float]], limit: float) -> Arch | None:
        within = [(value, -ms, arch.to_json(), arch) for arch, (value, ms) in scores.items() if ms <= limit]
        return max(within)[3] if within else None

    chosen = {("evolution", limit): best_within(proposed, limit) for limit in limits}
    chosen.update({("random", limit): best_within(random_scores, limit) for limit in limits})
    to_verify = list(dict.fromkeys(arch for arch in chosen.values() if arch is not None))

    settings = SearchSettings.from_config(config.search, targets=(target,))
    task_data = load_task_data(config.task, space, seed=config.training.seed)
    evaluator = Evaluator(build_payload(config, supernet, task_data, settings))
    evaluations = {arch: evaluator.evaluate(arch.to_json()) for arch in to_verify}
    kind = "int8" if target.endswith("int8") else "fp32"
    measured = measure_latency(
        {arch.to_json(): evaluation.models[kind] for arch, evaluation in evaluations.items()}, resolve_target(target), max_seconds=2.0 * len(evaluations)
    )
    real_trials = [(arch, value) for arch, value in zip(archs, accuracies.tolist(), strict=True)]

    rows = []
    for (method, limit), arch in chosen.items():
        if arch is None:
            rows.append({"method": method, "limit_ms": limit, "arch": None})
            continue
        value, ms = proposed.get(arch) or random_scores[arch]
        real_ms = measured[arch.to_json()].median_ms
        rows.append(
            {
                "method": method,
                "limit_ms": limit,
                "arch": arch.short_name(),
                "predicted_accuracy": value,
                "real_accuracy": evaluations[arch].accuracy,
                "predicted_ms": ms,
                "measured_ms": real_ms,
                "meets_limit": real_ms <= limit,
            }
        )
    searched_best = {}
    for limit in limits:
        trial_latency = {}
        for line in (args.run / "search" / "latency.jsonl").read_text().splitlines():
            record = json.loads(line)
            if record["target"] == target:
                trial_latency[record["arch"]] = record["measurement"]["median_ms"]
        within = [(value, arch.short_name()) for arch, value in real_trials if trial_latency.get(arch.to_json(), float("inf")) <= limit]
        searched_best[limit] = max(within) if within else None

    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.processor() or platform.machine(),
        "space": space.name,
        "space_size": space.count(),
        "target": target,
        "latency_predictor": latency.name,
        "accuracy_pairs": len(archs),
        "accuracy_held_out": {"kendall_tau": held_quality.kendall_tau, "mae": held_quality.mae, "pairs": held_quality.pairs},
        "trials": len(study.trials),
        "distinct_proposed": len(proposed),
        "search_seconds": search_seconds,
        "archs_per_second": len(study.trials) / search_seconds,
        "rows": rows,
        "measured_search_best": {str(limit): best for limit, best in searched_best.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(
        f"{space.name} ({space.count():,} subnets) on {target}: {len(study.trials)} trials in {search_seconds:.1f} s "
        f"({len(study.trials) / search_seconds:,.0f} archs/s), latency by {latency.name}, accuracy predictor from {len(archs)} "
        f"searched trials (held-out tau {held_quality.kendall_tau:.3f}, MAE {held_quality.mae:.4f})"
    )
    print()
    print("| limit ms | method | arch | predicted acc | real acc | predicted ms | measured ms | meets limit | measured search's best real acc |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        best = searched_best[row["limit_ms"]]
        shown = f"{best[0]:.4f}" if best else "-"
        if row["arch"] is None:
            print(f"| {row['limit_ms']:g} | {row['method']} | none within the limit | | | | | | {shown} |")
            continue
        print(
            f"| {row['limit_ms']:g} | {row['method']} | `{row['arch']}` | {row['predicted_accuracy']:.4f} | {row['real_accuracy']:.4f} | "
            f"{row['predicted_ms']:.4g} | {row['measured_ms']:.4g} | {'yes' if row['meets_limit'] else '**no**'} | {shown} |"
        )


if __name__ == "__main__":
    main()
