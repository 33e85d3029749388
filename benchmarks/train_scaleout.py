"""Supernet training across Ray Train workers: throughput of 2 workers against 1, and the same job either way.

    python benchmarks/train_scaleout.py [--space digits_quick] [--epochs 3] [--rounds 3] [--skip-equivalence]

Throughput: the space trained for ``--epochs`` epochs by one process with one thread, one process with two threads,
and two Ray Train workers with one thread each, in rotating order, ``--rounds`` times. The machine's own ceiling
beside them: two independent one-thread trainings at the same time (their images per second summed), which is what
two cores of this machine give two jobs that never wait for each other; data parallelism cannot beat it. Images per second counts the
training steps only (the run's ``train_seconds``: every worker waits for the others at each gradient all-reduce, so
rank 0's time is the group's); the wall time of the whole ``train`` call (Ray start-up and the final evaluation
included) is reported beside it. The spread is over rounds.

Equivalence: the space's full schedule trained by one worker at batch B and by two workers at B/2 each, same seed;
the per-epoch loss curves and the final accuracies side by side. The noise ceiling beside it: one worker with
another seed (what "the same result" cannot be closer than, for a change of the random draws alone).

Results go to ``benchmarks/results/train_scaleout/`` (a JSON with every figure, a markdown table).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from nas.space.schema import RunConfig, load_config, parse_config
from nas.training.loop import train

RESULTS = Path(__file__).resolve().parent / "results" / "train_scaleout"
SETUPS = (
    ("1 worker, 1 thread", 1, 1),
    ("1 worker, 2 threads", 1, 2),
    ("2 workers, 1 thread each", 2, 1),
    ("ceiling: 2 independent 1-thread runs at once", 0, 1),
)


def with_training(config: RunConfig, **training: Any) -> RunConfig:
    """``config`` with some ``training:`` options replaced (parsed again from the edited text, as a user's file)."""
    document = yaml.safe_load(config.text)
    document.setdefault("training", {}).update(training)
    return parse_config(yaml.safe_dump(document, sort_keys=False), f"{config.space.name} (benchmark)", base_dir=config.base_dir)


def run(config: RunConfig, workers: int, threads: int) -> dict[str, Any]:
    out = Path(tempfile.mkdtemp(prefix="nas-scaleout-")) / "run"
    torch.set_num_threads(threads)
    started = time.perf_counter()
    result = train(config, out, workers=workers)
    wall = time.perf_counter() - started
    losses = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
    return {"metrics": result.metrics, "wall_seconds": wall, "losses": losses}


def independent_seconds(config: RunConfig) -> float:
    """One single-thread training's train_seconds (run in a process of its own by ``ceiling``)."""
    return float(run(config, 1, 1)["metrics"]["train_seconds"])


def ceiling(config: RunConfig, images: int) -> float:
    """Images per second of two independent one-thread trainings run at the same time, summed."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        seconds = list(pool.map(independent_seconds, [config, config]))
    return sum(images / value for value in seconds)


def throughput(config: RunConfig, epochs: int, rounds: int) -> dict[str, Any]:
    config = with_training(config, epochs=epochs)
    from nas.data.tasks import load_task_data

    images = len(load_task_data(config.task, config.space, seed=config.training.seed).train.targets) // config.training.batch_size
    images *= config.training.batch_size * epochs
    figures: dict[str, dict[str, list[float]]] = {name: {"images_per_second": [], "wall_seconds": []} for name, _, _ in SETUPS}
    for round_index in range(rounds):
        order = SETUPS[round_index % len(SETUPS) :] + SETUPS[: round_index % len(SETUPS)]
        for name, workers, threads in order:
            if workers == 0:
                started = time.perf_counter()
                figures[name]["images_per_second"].append(ceiling(config, images))
                figures[name]["wall_seconds"].append(time.perf_counter() - started)
                print(f"round {round_index + 1}: {name}: {figures[name]['images_per_second'][-1]:.0f} images/s", flush=True)
                continue
            result = run(config, workers, threads)
            figures[name]["images_per_second"].append(images / result["metrics"]["train_seconds"])
            figures[name]["wall_seconds"].append(result["wall_seconds"])
            print(f"round {round_index + 1}: {name}: {figures[name]['images_per_second'][-1]:.0f} images/s, wall {result['wall_seconds']:.1f} s", flush=True)
    baseline = figures[SETUPS[0][0]]["images_per_second"]
    summary = {}
    for name, values in figures.items():
        ratios = [value / base for value, base in zip(values["images_per_second"], baseline, strict=True)]
        summary[name] = {**values, "speedup_over_1_thread": ratios}
    return {"epochs": epochs, "images_per_epoch_run": images, "rounds": rounds, "setups": summary}


def accuracies(metrics: dict[str, Any]) -> dict[str, float]:
    return {f"{size}.{split}": metrics[size][split] for size in ("largest", "smallest") for split in ("val", "test")}


def equivalence(config: RunConfig) -> dict[str, Any]:
    seed = config.training.seed
    runs = {
        "1 worker, batch B": run(config, 1, 1),
        "2 workers, batch B/2 each": run(config, 2, 1),
        "1 worker, batch B, another seed": run(with_training(config, seed=seed + 1), 1, 1),
    }
    return compare(
        {
            name: {"losses": values["losses"], "accuracies": accuracies(values["metrics"]), "wall_seconds": values["wall_seconds"]}
            for name, values in runs.items()
        },
        config,
    )


def compare(runs: dict[str, dict[str, Any]], config: RunConfig) -> dict[str, Any]:
    """Each run's loss curve and accuracies against the first run's: relative and log-ratio loss differences per
    epoch, how many epochs it is above, and the largest accuracy difference."""
    reference = next(iter(runs.values()))
    result: dict[str, Any] = {"batch_size": config.training.batch_size, "epochs": config.training.epochs, "seed": config.training.seed, "runs": {}}
    for name, values in runs.items():
        pairs = list(zip(values["losses"], reference["losses"], strict=True))
        relative = [abs(a - b) / abs(b) for a, b in pairs]
        differences = [abs(a - b) for a, b in zip(values["accuracies"].values(), reference["accuracies"].values(), strict=True)]
        result["runs"][name] = {
            **values,
            "max_relative_loss_difference": max(relative),
            "last_epoch_relative_loss_difference": relative[-1],
            "mean_abs_log_loss_ratio": sum(abs(math.log(a / b)) for a, b in pairs) / len(pairs),
            "epochs_with_higher_loss": sum(a > b for a, b in pairs),
            "max_accuracy_difference": max(differences),
        }
    return result


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def table(report: dict[str, Any]) -> str:
    lines = [f"Measured {report['date']} on {report['machine']}, {report['space']}.", ""]
    if "throughput" in report:
        figures = report["throughput"]
        lines += [
            f"Throughput ({figures['epochs']} epochs, {figures['rounds']} rounds; median, range over rounds):",
            "",
            "| setup | images/s | speed-up over 1 worker, 1 thread | wall s (incl. start-up, evaluation) |",
            "|---|---|---|---|",
        ]
        for name, values in figures["setups"].items():
            lines.append(f"| {name} | {spread(values['images_per_second'])} | {spread(values['speedup_over_1_thread'])} | {spread(values['wall_seconds'])} |")
        lines.append("")
    if "equivalence" in report:
        figures = report["equivalence"]
        lines += [
            f"Equivalence ({figures['epochs']} epochs, B = {figures['batch_size']}, seed {figures['seed']}; differences against 1 worker at B):",
            "",
            "| run | largest val | smallest val | largest test | smallest test | mean abs. log loss ratio | epochs with higher loss "
            "| last-epoch rel. loss diff | max acc. diff |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, values in figures["runs"].items():
            accuracy = values["accuracies"]
            lines.append(
                f"| {name} | {accuracy['largest.val']:.4f} | {accuracy['smallest.val']:.4f} | {accuracy['largest.test']:.4f} | "
                f"{accuracy['smallest.test']:.4f} | {values['mean_abs_log_loss_ratio']:.3f} | {values['epochs_with_higher_loss']} | "
                f"{values['last_epoch_relative_loss_difference']:.2e} | "
                f"{values['max_accuracy_difference']:.4f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", default="digits_quick")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of each throughput run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-equivalence", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    config = load_config(args.space)
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.node()} ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs)",
        "space": args.space,
        "torch": torch.__version__,
    }
    if not args.skip_throughput:
        report["throughput"] = throughput(config, args.epochs, args.rounds)
    if not args.skip_equivalence:
        report["equivalence"] = equivalence(config)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.space}.json").write_text(json.dumps(report, indent=1))
    (RESULTS / f"{args.space}.md").write_text(table(report))
    print(table(report))


if __name__ == "__main__":
    main()
