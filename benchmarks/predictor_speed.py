"""Throughput of every registered latency predictor's batched ``predict``, featurisation included, and of its parts.

Each predictor is fitted on ``--train`` archs with synthetic latencies (0.05 ms plus 1 ms per 10 MMACs, 2 % seeded
noise), warmed on the first ``WARM_UP`` archs (every piece of the space counted), then ``predict`` runs ``--repeats``
times on ``--archs`` sampled archs (the same batch in every repeat). A predictor whose first call (``PROBE`` archs)
projects past twice ``--budget`` seconds per repeat (``linear_macs`` builds every new subnet to count it) is timed on
the prefix of the batch that fits the budget, and the table says so. Then the parts of the ``gbdt`` path, each timed
alone on the full batch: the base class's arch check, the walk's one-hot features, the piece-wise costs, and
``predict_features`` on the ready matrix. Figures are archs per second, median with the min-max spread over the
repeats; they are absolute, so the machine and its load are printed with them.

    python benchmarks/predictor_speed.py [--space ofa_mbv3] [--archs 100000] [--repeats 5] [--train 200] [--budget 120]
"""

from __future__ import annotations

import argparse
import functools
import inspect
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import sklearn

from nas.latency import device_fingerprint, resolve_target
from nas.predictors import PREDICTORS, LatencyPredictor, create_predictor
from nas.predictors.adapt import MAX_MEASUREMENTS, adapt
from nas.predictors.learned import GbdtPredictor, PieceCosts
from nas.space.schema import load_config
from nas.supernets.space import Arch, SearchSpace

PROBE = 100
"""Archs of the first (cold) call, which decides whether a predictor is timed on the whole batch (it is when the whole
batch projects to under twice ``--budget``)."""

WARM_UP = 2000
"""Archs predicted once before timing: enough to count every piece of a built-in space."""


def machine() -> str:
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (
        f"{model}; {os.cpu_count()} logical cores; load average {load}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; "
        f"Python {platform.python_version()}, numpy {np.__version__}, scikit-learn {sklearn.__version__}"
    )


def rates(call: Callable[[], Any], count: int, repeats: int) -> tuple[float, float, float]:
    """``(median, min, max)`` of ``count / seconds`` over ``repeats`` timed calls."""
    values = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        values.append(count / (time.perf_counter() - started))
    return float(np.median(values)), float(min(values)), float(max(values))


def row(label: str, count: int, measured: tuple[float, float, float], note: str = "") -> str:
    median, low, high = measured
    return f"| {label} | {count:,} | {median:,.0f} | {low:,.0f} - {high:,.0f} | {note} |"


def fitted(space: SearchSpace, archs: Sequence[Arch], fingerprint: dict[str, Any]) -> dict[str, LatencyPredictor]:
    """Every registered predictor fitted on ``archs`` (``adapted`` on its first ``MAX_MEASUREMENTS``), plus
    ``adapted`` with a ``gbdt`` source."""
    macs = PieceCosts.for_space(space).matrix(archs)[:, 0]
    latencies = (0.05 + macs / 1e7) * (1 + 0.02 * np.random.default_rng(1).standard_normal(len(archs)))
    predictors: dict[str, LatencyPredictor] = {}
    for name in PREDICTORS.names():
        options = {"table": synthetic_table(space, archs)} if "table" in inspect.signature(PREDICTORS.get(name)).parameters else {}
        predictor = create_predictor(name, space, seed=0, **options)
        count = min(len(archs), MAX_MEASUREMENTS) if name == "adapted" else len(archs)
        predictors[name] = predictor.fit(archs[:count], latencies[:count], fingerprint)
    other = {**fingerprint, "cpu_model": "benchmark device B"}
    source = predictors.get("gbdt") or create_predictor("gbdt", space).fit(archs, latencies, fingerprint)
    predictors["adapted (gbdt source)"] = adapt(source, archs[:MAX_MEASUREMENTS], 1.7 * latencies[:MAX_MEASUREMENTS], other)
    return predictors


def synthetic_table(space: SearchSpace, archs: Sequence[Arch]) -> dict[str, dict[str, Any]]:
    """A piece table for the look-up-table predictors: every piece of ``archs`` at 0.01 ms plus 1 ms per 10 MMACs
    (pieces of the timed archs that are not among them are estimated, as in use)."""
    from nas.predictors.lut import PieceTable

    pieces = PieceCosts.for_space(space)
    entries: dict[str, dict[str, Any]] = {}
    for arch in archs:
        for piece in pieces.pieces(arch):
            key, entry = PieceTable.entry(space, piece, 0.01 + pieces.piece_cost(piece)[1] / 1e7)
            entries[key] = entry
    return entries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--space", default="ofa_mbv3")
    parser.add_argument("--archs", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--train", type=int, default=200)
    parser.add_argument("--budget", type=float, default=120.0, help="seconds one timed predict call may take; slower predictors get a prefix")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    space = load_config(args.space).space
    rng = np.random.default_rng(args.seed)
    started = time.perf_counter()
    train = [space.sample(rng) for _ in range(args.train)]
    archs = [space.sample(rng) for _ in range(args.archs)]
    print(f"# {machine()}")
    sampled = time.perf_counter() - started
    print(f"# space {args.space}; {args.archs:,} archs sampled in {sampled:.1f} s; {args.repeats} timed repeats after a warm-up call on {WARM_UP:,} archs")
    size = max(space.input_sizes)
    shape, dtype = ((1, space.in_channels, size, size), "float32") if space.modality == "image" else ((1, size), "int64")
    fingerprint = device_fingerprint(resolve_target("cpu_fp32"), input_shape=shape, input_dtype=dtype)
    started = time.perf_counter()
    predictors = fitted(space, train, fingerprint)
    print(f"# every predictor fitted on {args.train} archs in {time.perf_counter() - started:.1f} s")
    print()
    print("| predict (archs -> ms, featurisation included) | archs | archs/s (median) | min - max | note |")
    print("|---|---|---|---|---|")
    for label, predictor in predictors.items():
        probe = archs[:PROBE]
        started = time.perf_counter()
        predictor.predict(probe)
        cold = len(probe) / (time.perf_counter() - started)
        count = len(archs) if cold * args.budget >= len(archs) / 2 else max(len(probe), int(cold * args.budget))
        batch = archs[:count]
        if count == len(archs):
            note = f"first {PROBE} archs (cold caches) {cold:,.0f} archs/s"
        else:
            note = f"first {PROBE} archs {cold:,.1f} archs/s; timed on the first {count:,} archs, counted in the warm-up call"
        predictor.predict(batch if count < len(archs) else batch[:WARM_UP])
        print(row(label, count, rates(functools.partial(predictor.predict, batch), count, args.repeats), note), flush=True)
    gbdt = predictors.get("gbdt")
    if not isinstance(gbdt, GbdtPredictor):
        return
    walk = space.walk()
    costs = PieceCosts.for_space(space)
    matrix = gbdt.features(archs)
    print()
    print("| part of gbdt.predict | archs | archs/s (median) | min - max | note |")
    print("|---|---|---|---|---|")
    parts: list[tuple[str, Callable[[], Any], str]] = [
        ("space.check per arch (LatencyPredictor._checked_archs)", lambda: [space.check(arch) for arch in archs], "base class, every predictor"),
        ("walk.features (one-hot)", lambda: walk.features(archs), "SpaceWalk.values per arch"),
        ("PieceCosts.matrix (MACs, parameters)", lambda: costs.matrix(archs), "pieces cached"),
        ("gbdt.predict_features (ready matrix)", lambda: gbdt.predict_features(matrix), f"{len(gbdt.trees.trees) if gbdt.trees else 0} trees"),
    ]
    for label, call, note in parts:
        print(row(label, len(archs), rates(call, len(archs), args.repeats), note), flush=True)


if __name__ == "__main__":
    main()
