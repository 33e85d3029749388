"""How much of a space's exact accuracy-latency front each sampler finds at a small budget.

    OMP_NUM_THREADS=1 nas train mqar_quick --out /tmp/mqar_run
    OMP_NUM_THREADS=1 python benchmarks/search_quality.py --run /tmp/mqar_run [--seeds 20] [--budgets 0.01,0.02,0.05]
        [--samplers nsga2,tpe,random,evolution] [--margin 0.01] [--out benchmarks/results/search_quality] [--name results]

The trained run's space must be small enough to enumerate (``mqar_quick``: 544 subnets). Every subnet is listed by
walking the space's decisions (``SpaceWalk.walk``, an odometer over each active decision's choices; the count is
checked against ``SearchSpace.count``), then evaluated once exactly as the search evaluates a trial (``Evaluator``
on ``build_payload``: BN recalibrated, the fp32 ONNX export scored on the validation split) and its fp32 model
measured once on ``cpu_fp32`` (one thread, batch 1) with the project's protocol (``measure_latency``, interleaved,
a chunk of archs at a time in a shuffled order, ``search.measure_seconds`` per model as the loop caps it). Both are
cached in ``OUT/accuracy.jsonl`` and ``OUT/latency.jsonl`` keyed on the arch JSON (accuracy also on the checkpoint's
digest, latency on the device fingerprint), so a rerun skips the work. For the noise beside the table, ``--repeat``
archs are measured a second time in one interleaved call (``OUT/latency_repeat.jsonl``; relative differences and
the Kendall tau of the two rankings are reported).

Hypervolume: accuracy and latency are normalised to [0, 1] over the whole space (0 = the worst accuracy and the
fastest latency of any subnet, 1 = the best accuracy and the slowest); the reference point is ``--margin`` beyond
the worst corner (accuracy ``-margin``, latency ``1 + margin``). The exact front is the non-dominated set of the whole
table (``moocore.is_nondominated``) and every hypervolume is ``nas.search.front.hypervolume`` (moocore) of the
normalised points. The latency is the median, the search's objective (``--statistic p10``: the 10th percentile).

Each sampler of ``nas.search.samplers.SAMPLERS`` (``--samplers``, default every registered name whose library is
installed; the others are listed as skipped) drives an in-memory Optuna study exactly as ``nas.search.loop.run_search``
does with one worker: the largest and the smallest arch enqueued first (``--no-anchors`` leaves them out), batches
of ``--batch-size`` asks (8, the loop's batch with one worker), each trial suggesting its arch through
``suggest_arch``, directions (maximise accuracy, minimise latency), ``make_sampler(name, seed, population_size,
walk)`` with the run's ``search.population_size`` (``--population-size`` overrides it). The objective is a lookup in
the table. The budget counts distinct archs: a repeated proposal is told the stored values (``duplicate_of``) and
costs nothing, and the asks are bounded by ``MAX_ASKS_PER_TRIAL`` per budgeted arch as in the loop. Budgets are
fractions of the space's size (rounded). Baselines beside the samplers: the two anchors alone, and "rank by MACs"
(the budget's worth of archs at evenly spaced positions of the MAC ranking, smallest and largest included).

Reported per sampler and budget over the seeds: mean, standard deviation, min and max of the share of the exact
front's hypervolume reached, and how many exact-front members were found. Written: ``OUT/NAME.json`` (every number,
every run) and ``OUT/NAME.md`` (the table).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import moocore
import numpy as np
import optuna

from nas import jsonio
from nas.search.encoding import params_from_arch, suggest_arch
from nas.search.front import hypervolume
from nas.search.loop import MAX_ASKS_PER_TRIAL
from nas.search.samplers import SAMPLERS, make_sampler
from nas.supernets.space import Arch, SearchSpace
from nas.supernets.walk import Decision

logger = logging.getLogger("search_quality")

TARGET = "cpu_fp32"
LOOP_BATCH_SIZE = 8
"""``run_search``'s batch with one worker (``max(8, 4 * workers)``)."""
MEASURE_CHUNK = 32
MAX_ARCHS = 20_000
"""Refuse to enumerate a space larger than this: every subnet is evaluated and measured."""


@dataclass(frozen=True, slots=True)
class Point:
    """One arch as ``nas.search.front.hypervolume`` reads a trial: ``values = (accuracy, latency)``, normalised."""

    values: tuple[float, float]


def enumerate_archs(space: SearchSpace, limit: int = MAX_ARCHS) -> list[Arch]:
    """Every arch of ``space`` once, in walk order: an odometer over the choices of the decisions the walk asks for
    (an arch's active decisions depend only on the decisions before them, so incrementing the last decision that has
    a choice left and dropping the ones after it visits every arch exactly once). Raises ``ValueError`` when the
    space has more than ``limit`` archs or the enumeration disagrees with ``space.count()``."""
    total = space.count()
    if total > limit:
        raise ValueError(f"space {space.name!r} has {total:,} subnets, more than the {limit:,} this benchmark enumerates")
    walk = space.walk()
    archs: list[Arch] = []
    prefix: list[int] = []
    sizes: list[int] = []

    def choose(decision: Decision) -> Any:
        position = len(sizes)
        sizes.append(len(decision.choices))
        if position == len(prefix):
            prefix.append(0)
        return decision.choices[prefix[position]]

    while True:
        sizes.clear()
        archs.append(walk.walk(choose))
        del prefix[len(sizes) :]
        position = len(prefix) - 1
        while position >= 0 and prefix[position] + 1 >= sizes[position]:
            position -= 1
        if position < 0:
            break
        prefix[position] += 1
        del prefix[position + 1 :]
    if len(archs) != total or len({arch.to_json() for arch in archs}) != total:
        raise ValueError(f"enumerating space {space.name!r} gave {len(archs)} archs ({len({arch.to_json() for arch in archs})} distinct), its count is {total}")
    return archs


def budgets_of(size: int, fractions: Sequence[float]) -> list[int]:
    """The distinct-arch budget of each fraction of ``size`` (rounded, at least 1, at most ``size``)."""
    return [min(size, max(1, round(fraction * size))) for fraction in fractions]


@dataclass(frozen=True, slots=True)
class Table:
    """Every arch of a space with its accuracy and latency, and the normalisation and reference of the hypervolume."""

    archs: tuple[str, ...]
    accuracy: np.ndarray
    latency: np.ndarray
    margin: float

    @property
    def index(self) -> dict[str, int]:
        return {arch: position for position, arch in enumerate(self.archs)}

    def points(self, positions: Sequence[int]) -> list[Point]:
        """Normalised (accuracy, latency) of the archs at ``positions``: accuracy shifted by ``margin`` so that the
        reference accuracy is 0, as ``hypervolume`` takes it."""
        low, high = float(self.accuracy.min()), float(self.accuracy.max())
        fastest, slowest = float(self.latency.min()), float(self.latency.max())
        accuracy_span = (high - low) or 1.0
        latency_span = (slowest - fastest) or 1.0
        return [
            Point(((float(self.accuracy[position]) - low) / accuracy_span + self.margin, (float(self.latency[position]) - fastest) / latency_span))
            for position in positions
        ]

    def hypervolume(self, positions: Sequence[int]) -> float:
        return hypervolume(self.points(positions), 1, 1.0 + self.margin)

    def front(self) -> list[int]:
        """Positions of the exact front (weakly non-dominated archs), fastest first."""
        objectives = np.stack([-self.accuracy, self.latency], axis=1)
        mask = moocore.is_nondominated(objectives, keep_weakly=True)
        return sorted(np.flatnonzero(mask).tolist(), key=lambda position: (self.latency[position], -self.accuracy[position]))


@dataclass(frozen=True, slots=True)
class SamplerRun:
    """The distinct archs one sampler evaluated, in order, and what it cost in asks."""

    evaluated: tuple[str, ...]
    asks: int
    duplicates: int


def run_sampler(
    space: SearchSpace,
    lookup: Callable[[str], tuple[float, float]],
    sampler: str,
    *,
    seed: int,
    budget: int,
    population_size: int,
    batch_size: int = LOOP_BATCH_SIZE,
    anchors: bool = True,
) -> SamplerRun:
    """Drive ``sampler`` as ``run_search`` does with one worker (see the module docstring) until ``budget`` distinct
    archs are evaluated or ``MAX_ASKS_PER_TRIAL * budget`` asks are spent; ``lookup(arch_json) -> (accuracy,
    latency)`` is the objective."""
    from optuna.trial import TrialState

    study = optuna.create_study(
        directions=["maximize", "minimize"], sampler=make_sampler(sampler, seed=seed, population_size=population_size, walk=space.walk())
    )
    if anchors:
        for anchor in (space.largest(), space.smallest()):
            study.enqueue_trial(params_from_arch(space, anchor), user_attrs={"anchor": True})
    target_total = min(budget, space.count())
    completed: dict[str, tuple[int, tuple[float, float]]] = {}
    evaluated: list[str] = []
    asks = duplicates = 0
    max_asks = MAX_ASKS_PER_TRIAL * target_total
    while len(evaluated) < target_total and asks < max_asks:
        batch: dict[str, list[Any]] = {}
        while len(batch) < min(batch_size, target_total - len(evaluated)) and asks < max_asks:
            trial = study.ask()
            asks += 1
            arch_json = suggest_arch(trial, space).to_json()
            trial.set_user_attr("arch", arch_json)
            if arch_json in completed:
                number, values = completed[arch_json]
                trial.set_user_attr("duplicate_of", number)
                study.tell(trial, list(values))
                duplicates += 1
                continue
            batch.setdefault(arch_json, []).append(trial)
        for arch_json, trials in batch.items():
            values = lookup(arch_json)
            study.tell(trials[0], list(values))
            completed[arch_json] = (trials[0].number, values)
            evaluated.append(arch_json)
            for trial in trials[1:]:
                trial.set_user_attr("duplicate_of", trials[0].number)
                study.tell(trial, list(values))
                duplicates += 1
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if running:
        raise RuntimeError(f"{len(running)} trial(s) were left running by the sampler {sampler!r}")
    return SamplerRun(tuple(evaluated), asks, duplicates)


def rank_by_macs(macs: Sequence[int], budget: int) -> list[int]:
    """Positions of ``budget`` archs evenly spaced along the MAC ranking (ties broken by position), both ends in."""
    order = sorted(range(len(macs)), key=lambda position: (macs[position], position))
    picks = np.unique(np.round(np.linspace(0, len(order) - 1, budget)).astype(int))
    return [order[pick] for pick in picks.tolist()]


def summarise(values: Sequence[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=float)
    return {"mean": float(array.mean()), "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0, "min": float(array.min()), "max": float(array.max())}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_jsonl(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    for record in records:
        jsonio.append_line(path, record)


def without_fingerprint(measurement: dict[str, Any]) -> dict[str, Any]:
    """A measurement dict without its device fingerprint (the record's ``fingerprint_key`` names it, and the results
    hold it once)."""
    return {key: value for key, value in measurement.items() if key != "fingerprint"}


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def build_table(
    run: Path, archs: Sequence[Arch], out: Path, seed: int, repeat: int
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]], dict[str, dict[str, Any]], dict[str, Any]]:
    """Accuracy (``Evaluator``) and latency (``measure_latency`` on ``cpu_fp32``) of every arch, from the cache in
    ``out`` where it has them, else computed a chunk at a time and appended. Then, for the noise beside the table,
    ``repeat`` archs drawn with ``seed`` are measured a second time, together in one interleaved call
    (``latency_repeat.jsonl``). Returns the accuracy, latency and repeated-latency records by arch JSON and what the
    build did (seconds per stage, archs computed, the fingerprint)."""
    import torch

    from nas.data.tasks import load_task_data
    from nas.latency.fingerprint import device_fingerprint, fingerprint_key
    from nas.latency.protocol import measure_latency
    from nas.latency.targets import resolve_target
    from nas.run_dir import RunDir
    from nas.search.evaluators import Evaluator
    from nas.search.loop import build_payload
    from nas.search.settings import SearchSettings
    from nas.training.loop import load_run

    torch.set_num_threads(1)
    config, supernet, _ = load_run(run)
    settings = SearchSettings.from_config(config.search, targets=(TARGET,))
    target = resolve_target(TARGET, threads=settings.threads, batch_size=settings.batch_size)
    fingerprint = device_fingerprint(target)
    device_key = fingerprint_key(fingerprint)
    checkpoint = file_digest(RunDir(run).checkpoint / "weights.safetensors")
    accuracy_path, latency_path = out / "accuracy.jsonl", out / "latency.jsonl"
    accuracy = {record["arch"]: record for record in read_jsonl(accuracy_path) if record["checkpoint"] == checkpoint}
    latency = {record["arch"]: record for record in read_jsonl(latency_path) if record["fingerprint_key"] == device_key}
    wanted = {arch.to_json() for arch in archs}
    missing = [arch.to_json() for arch in archs if arch.to_json() not in accuracy or arch.to_json() not in latency]
    repeat_path = out / "latency_repeat.jsonl"
    repeated = {record["arch"]: record for record in read_jsonl(repeat_path) if record["fingerprint_key"] == device_key}
    drawn = np.random.default_rng(seed + 1).choice(len(archs), size=min(repeat, len(archs)), replace=False)
    repeat_missing = [archs[position].to_json() for position in sorted(drawn.tolist()) if archs[position].to_json() not in repeated]
    stats: dict[str, Any] = {
        "checkpoint": checkpoint,
        "fingerprint": fingerprint,
        "cached": len(wanted) - len(missing),
        "computed": len(missing),
        "evaluation_seconds": 0.0,
        "measurement_seconds": 0.0,
        "repeat_seconds": 0.0,
    }
    if not missing and not repeat_missing:
        return accuracy, latency, repeated, stats
    started = time.perf_counter()
    task_data = load_task_data(config.task, config.space, seed=config.training.seed)
    evaluator = Evaluator(build_payload(config, supernet, task_data, settings))
    stats["evaluation_seconds"] += time.perf_counter() - started
    if missing:
        order = np.random.default_rng(seed).permutation(len(missing))
        missing = [missing[position] for position in order.tolist()]
        for start in range(0, len(missing), MEASURE_CHUNK):
            chunk = missing[start : start + MEASURE_CHUNK]
            started = time.perf_counter()
            evaluations = {arch_json: evaluator.evaluate(arch_json) for arch_json in chunk}
            evaluated_at = time.perf_counter()
            measured = measure_latency(
                {arch_json: evaluation.models["fp32"] for arch_json, evaluation in evaluations.items()},
                target,
                max_seconds=settings.measure_seconds * len(chunk),
                seed=settings.seed,
            )
            measured_at = time.perf_counter()
            stats["evaluation_seconds"] += evaluated_at - started
            stats["measurement_seconds"] += measured_at - evaluated_at
            accuracy_records = [
                {
                    "arch": arch_json,
                    "checkpoint": checkpoint,
                    "accuracy": evaluation.accuracy,
                    "params": evaluation.params,
                    "macs": evaluation.macs,
                    "seconds": evaluation.seconds,
                }
                for arch_json, evaluation in evaluations.items()
            ]
            latency_records = [
                {"arch": arch_json, "target": TARGET, "fingerprint_key": device_key, "measurement": without_fingerprint(measurement.to_dict())}
                for arch_json, measurement in measured.items()
            ]
            append_jsonl(accuracy_path, accuracy_records)
            append_jsonl(latency_path, latency_records)
            accuracy.update({record["arch"]: record for record in accuracy_records})
            latency.update({record["arch"]: record for record in latency_records})
            logger.info(
                "%d/%d archs: evaluated in %.1f s, measured in %.1f s", start + len(chunk), len(missing), evaluated_at - started, measured_at - evaluated_at
            )
    if repeat_missing:
        started = time.perf_counter()
        models = {arch_json: evaluator.evaluate(arch_json).models["fp32"] for arch_json in repeat_missing}
        measured = measure_latency(models, target, max_seconds=settings.measure_seconds * len(models), seed=settings.seed)
        records = [
            {"arch": arch_json, "target": TARGET, "fingerprint_key": device_key, "measurement": without_fingerprint(measurement.to_dict())}
            for arch_json, measurement in measured.items()
        ]
        append_jsonl(repeat_path, records)
        repeated.update({record["arch"]: record for record in records})
        stats["repeat_seconds"] = time.perf_counter() - started
        logger.info("%d archs measured again in %.1f s", len(records), stats["repeat_seconds"])
    return accuracy, latency, repeated, stats


def repeat_agreement(first: Sequence[float], second: Sequence[float]) -> dict[str, Any]:
    """How two measurements of the same archs agree: the relative difference ``second / first - 1`` (median and
    quartiles of its absolute value) and the Kendall tau of the two rankings."""
    from scipy.stats import kendalltau

    first_array, second_array = np.asarray(first, dtype=float), np.asarray(second, dtype=float)
    difference = np.abs(second_array / first_array - 1.0)
    return {
        "archs": len(first_array),
        "relative_difference_median": float(np.median(difference)),
        "relative_difference_p75": float(np.percentile(difference, 75)),
        "relative_difference_max": float(difference.max()),
        "kendall_tau": float(kendalltau(first_array, second_array).statistic),
    }


def markdown(result: Mapping[str, Any]) -> str:
    budgets = result["budgets"]
    header = "| sampler | " + " | ".join(f"{budget['fraction']:.0%} ({budget['archs']} archs)" for budget in budgets) + " |"
    lines = [
        f"Share of the exact front's hypervolume reached ({result['space']}, {result['space_size']} subnets, exact front {len(result['exact_front'])} archs; "
        f"mean ± std [min, max] over {result['seeds']} seeds; reference {result['margin']} beyond the worst normalised corner; "
        f"latency {result['statistic']}; population size {result['population_size']}; "
        + ("anchors (largest, smallest) in every sampler's budget)" if result["anchors"] else "no anchors)"),
        "",
        header,
        "|---|" + "---|" * len(budgets),
    ]
    for name in result["samplers"]:
        cells = []
        for budget in budgets:
            cell = result["results"][name][str(budget["archs"])]
            share = cell["share"]
            cells.append(f"{share['mean']:.3f} ± {share['std']:.3f} [{share['min']:.3f}, {share['max']:.3f}], front {cell['front_found']['mean']:.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    by_macs = result["baselines"]["rank_by_macs"]
    macs_cells = [f"{by_macs[str(budget['archs'])]['share']:.3f}, front {by_macs[str(budget['archs'])]['front_found']}" for budget in budgets]
    lines.append("| rank by MACs (one pick) | " + " | ".join(macs_cells) + " |")
    anchors = result["baselines"]["anchors_only"]
    lines.append(f"| anchors only (2 archs) | {anchors['share']:.3f}, front {anchors['front_found']} |" + " |" * (len(budgets) - 1))
    lines.append("")
    lines.append("Cells: share of the exact hypervolume, mean ± std [min, max]; front: exact-front members found (mean).")
    repeat = result["latency_repeat"]
    if repeat:
        statistic = repeat[result["statistic"]]
        lines.append(
            f"Latency noise: {statistic['archs']} archs measured twice ({result['statistic']}): "
            f"median |difference| {statistic['relative_difference_median']:.1%}, "
            f"p75 {statistic['relative_difference_p75']:.1%}, max {statistic['relative_difference_max']:.1%}, Kendall tau {statistic['kendall_tau']:.3f}."
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a trained run of a space small enough to enumerate")
    parser.add_argument("--samplers", default="", help="comma-separated registered sampler names (default: every registered one)")
    parser.add_argument("--budgets", default="0.01,0.02,0.05", help="comma-separated fractions of the space's size")
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--margin", type=float, default=0.01, help="reference point beyond the worst normalised corner")
    parser.add_argument("--population-size", type=int, default=None, help="default: the run's search.population_size")
    parser.add_argument("--batch-size", type=int, default=LOOP_BATCH_SIZE)
    parser.add_argument("--statistic", choices=("median", "p10"), default="median", help="the latency objective (the search's is the median)")
    parser.add_argument("--no-anchors", action="store_true", help="do not enqueue the largest and smallest arch first (the search does)")
    parser.add_argument("--repeat", type=int, default=48, help="archs measured a second time, for the latency noise")
    parser.add_argument("--name", default="results", help="OUT/NAME.json and OUT/NAME.md receive the results")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "search_quality")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from nas.training.loop import load_run

    samplers = [name.strip() for name in args.samplers.split(",") if name.strip()] or list(SAMPLERS.names())
    for name in samplers:
        problem = SAMPLERS.problem(name)
        if problem is not None:
            parser.error(f"--samplers: sampler {problem}")
    fractions = [float(value) for value in args.budgets.split(",")]
    if args.seeds < 2 or not 0 < args.margin or any(not 0 < fraction <= 1 for fraction in fractions):
        parser.error(f"--seeds must be >= 2, --margin > 0 and every budget in (0, 1]; got {args.seeds}, {args.margin}, {fractions}")
    args.out.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    config, _, _ = load_run(args.run)
    space = config.space
    population_size = args.population_size or config.search.population_size
    archs = enumerate_archs(space)
    enumeration_seconds = time.perf_counter() - started

    started = time.perf_counter()
    accuracy, latency, repeated, build = build_table(args.run, archs, args.out, seed=0, repeat=args.repeat)
    table_seconds = time.perf_counter() - started
    arch_jsons = tuple(arch.to_json() for arch in archs)
    table = Table(
        arch_jsons,
        np.asarray([accuracy[arch]["accuracy"] for arch in arch_jsons], dtype=float),
        np.asarray([latency[arch]["measurement"][f"{args.statistic}_ms"] for arch in arch_jsons], dtype=float),
        args.margin,
    )
    index = table.index
    macs = [int(accuracy[arch]["macs"]) for arch in arch_jsons]
    front = table.front()
    exact = table.hypervolume(list(range(len(arch_jsons))))
    front_set = set(front)

    def lookup(arch_json: str) -> tuple[float, float]:
        position = index[arch_json]
        return float(table.accuracy[position]), float(table.latency[position])

    budgets = budgets_of(len(arch_jsons), fractions)
    started = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for name in list(samplers):
        try:
            make_sampler(name, seed=0, population_size=population_size, walk=space.walk())
        except ImportError as error:
            if args.samplers:
                raise
            skipped[name] = str(error)
            samplers.remove(name)
            logger.warning("sampler %s skipped (not installed): %s", name, error)
    for name in samplers:
        results[name] = {}
        for budget in budgets:
            runs = []
            sampler_started = time.perf_counter()
            for seed in range(args.seeds):
                run = run_sampler(
                    space, lookup, name, seed=seed, budget=budget, population_size=population_size, batch_size=args.batch_size, anchors=not args.no_anchors
                )
                positions = [index[arch] for arch in run.evaluated]
                runs.append(
                    {
                        "seed": seed,
                        "share": table.hypervolume(positions) / exact,
                        "evaluated": len(positions),
                        "asks": run.asks,
                        "duplicates": run.duplicates,
                        "front_found": len(front_set.intersection(positions)),
                    }
                )
            results[name][str(budget)] = {
                "share": summarise([run["share"] for run in runs]),
                "front_found": summarise([run["front_found"] for run in runs]),
                "seconds": time.perf_counter() - sampler_started,
                "runs": runs,
            }
            logger.info(
                "%s at %d archs: share %.3f ± %.3f", name, budget, results[name][str(budget)]["share"]["mean"], results[name][str(budget)]["share"]["std"]
            )
    sampler_seconds = time.perf_counter() - started

    anchors = [index[space.largest().to_json()], index[space.smallest().to_json()]]
    baselines = {
        "anchors_only": {"share": table.hypervolume(anchors) / exact, "front_found": len(front_set.intersection(anchors))},
        "rank_by_macs": {
            str(budget): {"share": table.hypervolume(picks) / exact, "front_found": len(front_set.intersection(picks))}
            for budget in budgets
            for picks in [rank_by_macs(macs, budget)]
        },
    }
    cpu = build["fingerprint"]
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{cpu['cpu_model']} ({', '.join(cpu['cpu_flags'])}), {cpu['logical_cores']} logical cores",
        "space": space.name,
        "space_size": len(arch_jsons),
        "run": str(args.run),
        "checkpoint": build["checkpoint"],
        "target": TARGET,
        "latency": "measured (nas.latency.protocol.measure_latency, interleaved, cpu_fp32, 1 thread, batch 1)",
        "fingerprint": build["fingerprint"],
        "normalisation": {
            "accuracy": [float(table.accuracy.min()), float(table.accuracy.max())],
            "latency_ms": [float(table.latency.min()), float(table.latency.max())],
        },
        "margin": args.margin,
        "reference_point": {"normalised_accuracy": -args.margin, "normalised_latency": 1.0 + args.margin},
        "exact_hypervolume": exact,
        "exact_front": [
            {
                "arch": Arch.from_json(arch_jsons[position], space).short_name(),
                "accuracy": float(table.accuracy[position]),
                "latency_ms": float(table.latency[position]),
            }
            for position in front
        ],
        "samplers": samplers,
        "samplers_skipped": skipped,
        "statistic": args.statistic,
        "anchors": not args.no_anchors,
        "population_size": population_size,
        "batch_size": args.batch_size,
        "seeds": args.seeds,
        "budgets": [{"fraction": fraction, "archs": budget} for fraction, budget in zip(fractions, budgets, strict=True)],
        "results": results,
        "baselines": baselines,
        "latency_cv": summarise([float(latency[arch]["measurement"]["cv"]) for arch in arch_jsons]),
        "unstable_measurements": sum(not latency[arch]["measurement"]["stable"] for arch in arch_jsons),
        "latency_repeat": {
            statistic: repeat_agreement(
                [latency[arch]["measurement"][f"{statistic}_ms"] for arch in repeated],
                [record["measurement"][f"{statistic}_ms"] for record in repeated.values()],
            )
            for statistic in ("median", "p10")
        }
        if repeated
        else None,
        "seconds": {
            "enumeration": enumeration_seconds,
            "table": table_seconds,
            "table_evaluation": build["evaluation_seconds"],
            "table_measurement": build["measurement_seconds"],
            "table_repeat": build["repeat_seconds"],
            "table_archs_computed": build["computed"],
            "samplers": sampler_seconds,
        },
    }
    jsonio.write(args.out / f"{args.name}.json", result)
    text = markdown(result)
    (args.out / f"{args.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
