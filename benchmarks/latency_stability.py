"""The same arch measured in separate processes: how far apart the reported latencies are, with and without the
protocol of ``nas.latency.measure_latency``.

The largest arch of a space (default ``digits_quick``), and its smallest as a reference for ratios, are exported
to fp32 and INT8 ONNX in a temporary folder from a randomly initialised supernet: latency does not depend on the
weight values (same graph, same shapes, same kernels), so no training is needed. Then ``--processes`` fresh
Python processes run one after the other; each measures the files twice:

* naive: per file a fresh session, no warm-up, ``--naive-repeats`` timed runs, their mean (what a quick script
  does), the files one after the other;
* protocol: ``measure_latency`` of both archs together (interleaved) on ``cpu_fp32``, then on ``cpu_int8``
  (warm-up, rotating blocks, ``--min-seconds``, the stability rule, ``--max-seconds``), median and p10.

The naive measurements run first in each process, as in a script that measures once and exits. Reported per
target and figure: the value each process reported, their mean, the across-process CV (``std / mean`` of the
values, population std) and the mean within-process CV (the protocol's reported robust CV ``1.4826 * MAD /
median``; for the naive runs ``std / mean`` of their samples). Printed as markdown for ``benchmarks/README.md``.

    python benchmarks/latency_stability.py [--processes 5] [--space digits_quick] [--threads 1] [--min-seconds 1]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPOSITORY = Path(__file__).resolve().parent.parent
TARGETS = ("cpu_fp32", "cpu_int8")
ARCHS = ("largest", "smallest")


def export_models(space_name: str, folder: Path) -> dict[str, tuple[Path, Path, str]]:
    """arch label -> (fp32 file, INT8 file, short name) for the largest and smallest arch of a randomly initialised
    supernet."""
    import torch

    from nas.export.onnx import export_onnx, quantize_int8
    from nas.space.schema import load_config
    from nas.supernets.supernet import Supernet

    torch.manual_seed(0)
    torch.set_num_threads(1)
    space = load_config(space_name).space
    supernet = Supernet(space).eval()
    files = {}
    for label in ("largest", "smallest"):
        arch = space.largest() if label == "largest" else space.smallest()
        static = supernet.extract(arch).eval()
        if space.modality == "image":
            inputs = torch.randn(130, space.in_channels, arch.resolution, arch.resolution)
        else:
            inputs = torch.randint(0, space.in_channels, (130, arch.sequence_length))
        fp32 = folder / f"{label}.onnx"
        int8 = folder / f"{label}.int8.onnx"
        export_onnx(static, inputs[:2], fp32, arch=arch, space_name=space.name)
        quantize_int8(fp32, int8, calibration=inputs[2:], validation=inputs[2:34], min_agreement=0.0)
        files[label] = (fp32, int8, arch.short_name())
    return files


def naive_latency(path: str, threads: int, repeats: int) -> tuple[float, float]:
    """``(mean ms, std / mean)`` of ``repeats`` runs of a fresh session, without warm-up."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    metadata = session.get_inputs()[0]
    shape = [1 if not isinstance(size, int) else size for size in metadata.shape]
    generator = np.random.default_rng(0)
    if metadata.type == "tensor(int64)":
        array = generator.integers(0, 2, size=shape, dtype=np.int64)
    else:
        array = generator.standard_normal(shape).astype(np.float32)
    samples = []
    for _ in range(repeats):
        started = time.perf_counter_ns()
        session.run(None, {metadata.name: array})
        samples.append((time.perf_counter_ns() - started) / 1e6)
    values = np.asarray(samples)
    return float(values.mean()), float(values.std() / values.mean())


def worker(arguments: dict) -> None:
    """One process: naive then protocol measurements of both archs on both targets; prints one JSON line."""
    from nas.latency.protocol import measure_latency
    from nas.latency.targets import resolve_target

    result: dict[str, dict] = {}
    for target_name in TARGETS:
        result[target_name] = {}
        for label in ARCHS:
            mean, cv = naive_latency(arguments[target_name][label], arguments["threads"], arguments["naive_repeats"])
            result[target_name][f"naive_{label}_ms"] = mean
            result[target_name][f"naive_{label}_cv"] = cv
    for target_name in TARGETS:
        target = resolve_target(target_name, threads=arguments["threads"])
        measurements = measure_latency(arguments[target_name], target, min_seconds=arguments["min_seconds"], max_seconds=arguments["max_seconds"])
        for label, measurement in measurements.items():
            result[target_name].update(
                {
                    f"median_{label}_ms": measurement.median_ms,
                    f"p10_{label}_ms": measurement.p10_ms,
                    f"cv_{label}": measurement.cv,
                    f"samples_{label}": measurement.samples,
                    f"stable_{label}": measurement.stable,
                    f"seconds_{label}": measurement.seconds,
                }
            )
    print(json.dumps(result))


def across_cv(values: list[float]) -> float:
    array = np.asarray(values, dtype=np.float64)
    return float(array.std() / array.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, default=5)
    parser.add_argument("--space", default="digits_quick")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--min-seconds", type=float, default=1.0)
    parser.add_argument("--max-seconds", type=float, default=5.0)
    parser.add_argument("--naive-repeats", type=int, default=10)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return

    import onnxruntime

    from nas.latency.fingerprint import device_fingerprint
    from nas.latency.targets import resolve_target

    with tempfile.TemporaryDirectory(prefix="nasforge-latency-stability-") as scratch:
        files = export_models(args.space, Path(scratch))
        arguments = {
            "cpu_fp32": {label: str(files[label][0]) for label in ARCHS},
            "cpu_int8": {label: str(files[label][1]) for label in ARCHS},
            "threads": args.threads,
            "min_seconds": args.min_seconds,
            "max_seconds": args.max_seconds,
            "naive_repeats": args.naive_repeats,
        }
        path = os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")]))
        environment = {**os.environ, "PYTHONPATH": path}
        runs = []
        for _ in range(args.processes):
            started = time.perf_counter()
            completed = subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(arguments)],
                capture_output=True,
                text=True,
                check=True,
                cwd=REPOSITORY,
                env=environment,
            )
            run = json.loads(completed.stdout.strip().splitlines()[-1])
            run["wall_seconds"] = time.perf_counter() - started
            runs.append(run)

    fingerprint = device_fingerprint(resolve_target("cpu_fp32", threads=args.threads))
    print(
        f"# {args.space}: largest ({files['largest'][2]}) and smallest ({files['smallest'][2]}), batch 1, "
        f"{args.threads} thread(s), {args.processes} processes, min_seconds {args.min_seconds:g}, "
        f"max_seconds {args.max_seconds:g}; {fingerprint['cpu_model']} x{fingerprint['logical_cores']} "
        f"[{', '.join(fingerprint['cpu_flags'])}], onnxruntime {onnxruntime.__version__}, "
        f"Python {platform.python_version()}, {datetime.date.today().isoformat()}"
    )
    print()
    print("| target | figure | per process | mean | across-process CV | within-process CV (mean) |")
    print("|---|---|---|---|---|---|")
    naive = f"naive ({args.naive_repeats} runs, no warm-up, mean)"
    for target_name in TARGETS:
        rows = (
            (f"largest, {naive}, ms", [run[target_name]["naive_largest_ms"] for run in runs], [run[target_name]["naive_largest_cv"] for run in runs]),
            ("largest, measure_latency median, ms", [run[target_name]["median_largest_ms"] for run in runs], [run[target_name]["cv_largest"] for run in runs]),
            ("largest, measure_latency p10, ms", [run[target_name]["p10_largest_ms"] for run in runs], None),
            (f"largest / smallest, {naive}", [run[target_name]["naive_largest_ms"] / run[target_name]["naive_smallest_ms"] for run in runs], None),
            (
                "largest / smallest, measure_latency median (interleaved)",
                [run[target_name]["median_largest_ms"] / run[target_name]["median_smallest_ms"] for run in runs],
                None,
            ),
        )
        for label, values, within in rows:
            within_text = "" if within is None else f"{100 * float(np.mean(within)):.1f}%"
            print(
                f"| {target_name} | {label} | {', '.join(f'{value:.3f}' for value in values)} | "
                f"{np.mean(values):.3f} | {100 * across_cv(values):.1f}% | {within_text} |"
            )
    ratios = [run["cpu_int8"]["median_largest_ms"] / run["cpu_fp32"]["median_largest_ms"] for run in runs]
    print(
        f"| int8 / fp32 | largest, measure_latency median (two calls, not interleaved) | "
        f"{', '.join(f'{value:.3f}' for value in ratios)} | {np.mean(ratios):.3f} | {100 * across_cv(ratios):.1f}% | |"
    )
    print()
    for target_name in TARGETS:
        for label in ARCHS:
            samples = [run[target_name][f"samples_{label}"] for run in runs]
            stable = sum(run[target_name][f"stable_{label}"] for run in runs)
            seconds = [run[target_name][f"seconds_{label}"] for run in runs]
            print(
                f"- {target_name} {label}: measure_latency took {min(samples)}-{max(samples)} timed runs, "
                f"{min(seconds):.2f}-{max(seconds):.2f} s of model time, stable in {stable}/{len(runs)} processes."
            )
    walls = ", ".join(f"{run['wall_seconds']:.1f}" for run in runs)
    print(f"- wall time per process (imports, sessions, all measurements): {walls} s")


if __name__ == "__main__":
    main()
