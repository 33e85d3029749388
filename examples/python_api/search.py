"""A search driven from Python instead of the command line: train the quickstart supernet, search with TPE against
measured CPU latency under a parameter budget, read the front from the Optuna study, and export one member.

    python examples/python_api/search.py [--out runs/python_api] [--epochs 25] [--trials 40]

Every step is the function the CLI calls, so what you read here is what `nas run` does.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np

from nas.export.subnet import export_loaded, load_export_context
from nas.search.front import pareto_front
from nas.search.loop import run_search
from nas.search.settings import SearchSettings
from nas.space import load_config
from nas.supernets.space import Arch
from nas.training.loop import train


def run(arguments: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/python_api"))
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--trials", type=int, default=40)
    args = parser.parse_args(arguments)

    config = load_config("digits_quick")
    config = dataclasses.replace(config, training=config.training.model_copy(update={"epochs": args.epochs}))
    space = config.space
    walk = space.walk()
    print(f"{space.name}: {space.count():,} subnets, {len(walk.decisions)} decisions, e.g. {walk.decisions[0].name}")
    print("a random arch:", space.sample(np.random.default_rng(0)).short_name())

    result = train(config, args.out, resume=(args.out / "checkpoint").exists())
    print("supernet:", {name: values["val"] for name, values in result.metrics.items() if isinstance(values, dict) and "val" in values})

    settings = SearchSettings.from_config(config.search, trials=args.trials, sampler="tpe", targets=("cpu_fp32",))
    settings = dataclasses.replace(settings, max_params=60_000, measure_seconds=0.3)
    search = run_search(args.out, settings, resume=(args.out / "search").exists())
    front = pareto_front(search.study, "cpu_fp32")
    print(f"front on cpu_fp32 ({len(front)} archs, params <= {settings.max_params:,}):")
    for trial in sorted(front, key=lambda trial: trial.values[1]):
        print(f"  trial {trial.number:3d}  acc {trial.values[0]:.4f}  {trial.values[1]:.4g} ms  {trial.user_attrs['params']:,} params")

    best = max(front, key=lambda trial: trial.values[0])
    context = load_export_context(args.out)
    report = export_loaded(context, Arch.from_json(best.user_attrs["arch"], context.config.space), int8=False, out=args.out / "best")
    print(
        f"exported trial {best.number} to {report.out_dir} (ONNX vs PyTorch max |error| {report.export.max_abs_error:.2g}, test acc {report.test_accuracy:.4f})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
