"""Train the built-in quickstart spaces and report each block family's largest and smallest subnet accuracy.

    python benchmarks/train_quickstarts.py [digits_quick mqar_quick] [--out benchmarks/runs]

Accuracy is top-1 on the held-out test split with inherited weights after BN recalibration (MQAR: over the
query positions). Wall time is the whole `train` call on this machine, loading data included.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
import time
from pathlib import Path

from nas.space.schema import load_config
from nas.training.loop import train


def rows(name: str, metrics: dict) -> list[tuple[str, str, float, float]]:
    families = metrics.get("families") or {"(all)": {"largest": metrics["largest"], "smallest": metrics["smallest"]}}
    return [(name, family, values["largest"]["test"], values["smallest"]["test"]) for family, values in families.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("spaces", nargs="*", default=["digits_quick", "mqar_quick"])
    args = parser.parse_args()
    print(f"# {platform.processor() or platform.machine()}, {platform.node()}")
    print("| space | family | largest test acc | smallest test acc | wall (s) |")
    print("|---|---|---|---|---|")
    for name in args.spaces:
        out = Path(tempfile.mkdtemp(prefix=f"nas-{name}-"))
        started = time.perf_counter()
        result = train(load_config(name), out)
        wall = time.perf_counter() - started
        for space, family, largest, smallest in rows(name, result.metrics):
            print(f"| {space} | {family} | {largest:.4f} | {smallest:.4f} | {wall:.0f} |", flush=True)
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
