"""Eval forward time of the supernet with an active arch vs the extracted static module, side by side.

For each space and arch, the two models run interleaved (A, B, A, B, ...) on the same input for ``--rounds``
rounds of ``--repeats`` calls each; the ratio supernet / static is computed per round, and the median ratio is
reported with its 10th-90th percentile spread. Ratios measured in one process on one core are robust to the
machine's load in a way absolute times are not.

    python benchmarks/extract_overhead.py [--rounds 30] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from nas.space.schema import load_config
from nas.supernets.supernet import Supernet

CASES = (("digits_quick", 128), ("mqar_quick", 32), ("ofa_mbv3", 8))


def timed(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    started = time.perf_counter()
    for _ in range(repeats):
        model(x)
    return (time.perf_counter() - started) / repeats


def measure(name: str, batch: int, rounds: int, repeats: int, seed: int) -> list[tuple[str, float, float, float]]:
    space = load_config(name).space
    torch.manual_seed(0)
    supernet = Supernet(space).eval()
    rng = np.random.default_rng(seed)
    archs = {"largest": space.largest(), "smallest": space.smallest(), "random": space.sample(rng)}
    rows = []
    for label, arch in archs.items():
        size = arch.resolution or arch.sequence_length
        if space.modality == "image":
            x = torch.randn(batch, space.in_channels, size, size)
        else:
            x = torch.randint(0, space.in_channels, (batch, size))
        supernet.set_active(arch)
        static = supernet.extract().eval()
        ratios = []
        with torch.inference_mode():
            for model in (supernet, static):
                timed(model, x, 2)
            for _ in range(rounds):
                elastic_time = timed(supernet, x, repeats)
                static_time = timed(static, x, repeats)
                ratios.append(elastic_time / static_time)
        ratios_array = np.array(ratios)
        rows.append((f"{name} {label}", float(np.median(ratios_array)), float(np.percentile(ratios_array, 10)), float(np.percentile(ratios_array, 90))))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s), {args.rounds} rounds x {args.repeats}")
    print("| space / arch | supernet / static (median) | p10 | p90 |")
    print("|---|---|---|---|")
    for name, batch in CASES:
        for label, median, low, high in measure(name, batch, args.rounds, args.repeats, args.seed):
            print(f"| {label} | {median:.3f} | {low:.3f} | {high:.3f} |")


if __name__ == "__main__":
    main()
