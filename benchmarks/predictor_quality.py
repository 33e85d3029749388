"""Latency-predictor quality per (space, target): the held-out table of each hardware profile, side by side.

    nas profile benchmarks/spaces/ofa_mbv3_r160_224.yaml --target cpu_fp32 --budget 500 --out benchmarks/results/profiles/ofa_mbv3_r160_224/cpu_fp32
    python benchmarks/predictor_quality.py benchmarks/results/profiles/*/* hardware_profiles/*/*

Each profile (``nas profile``) fits every predictor on four fifths of a designed sample and scores it on the held-out
fifth against its measurement; the noise floor is a second measurement of the same held-out archs against the first
(no predictor can be judged finer). Beside them: the trivial baseline ``linear_macs`` (latency as a line in MACs and
parameters) and the cost to build the profile. This script only gathers ``quality.json`` files into one markdown
table (``benchmarks/results/predictor_quality.md``) with the goal checked per row; it measures nothing.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

GOAL_WITHIN_10 = 0.99
GOAL_TAU = 0.95
GOAL_MEASUREMENTS = 500
GOAL_MINUTES = 10.0


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def rows(folder: Path) -> list[str]:
    report = json.loads((folder / "quality.json").read_text())
    header = json.loads((folder / "profile.json").read_text())
    noise = report["noise_floor"] or {}
    # A profile kept under another folder name (a space as it was, e.g. ofa_mbv3_r224) is labelled with both.
    space = report["space"] if folder.parent.name == report["space"] else f"{report['space']} ({folder.parent.name})"
    cost = report["cost"]
    arch_measurements = report["measured"] - report.get("pieces", 0)
    lines = []
    for name, row in report["predictors"].items():
        if "error" in row:
            lines.append(f"| {space} | {report['target']} | {name} | not fitted: {row['error']} | | | | | |")
            continue
        met = (
            row["within_10"] >= GOAL_WITHIN_10
            and row["within_10"] >= noise.get("within_10", 0.0)
            and row["kendall_tau"] >= GOAL_TAU
            and arch_measurements <= GOAL_MEASUREMENTS
            and cost["minutes"] <= GOAL_MINUTES
        )
        best = " (best)" if header.get("best") == name else ""
        lines.append(
            f"| {space} | {report['target']} | {name}{best} | {row['count']} | {percent(row['within_5'])} | {percent(row['within_10'])} | "
            f"{percent(row['mape'])} | {row['kendall_tau']:.3f} | {'met' if met else 'not met'} |"
        )
    if noise:
        lines.append(
            f"| {space} | {report['target']} | noise floor (2nd vs 1st measurement) | {noise['count']} | {percent(noise['within_5'])} | "
            f"{percent(noise['within_10'])} | {percent(noise['mape'])} | {noise['kendall_tau']:.3f} | |"
        )
    span = report["latency_range_ms"]
    lines.append(
        f"| {space} | {report['target']} | cost: {arch_measurements} arch + {report.get('pieces', 0)} piece measurements, "
        f"{cost['minutes']:.1f} min; latencies {span[0]:.3g}-{span[1]:.3g} ms | | | | | | |"
    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profiles", nargs="+", type=Path, help="profile folders (each with quality.json)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "predictor_quality.md")
    args = parser.parse_args()
    folders = [folder for folder in args.profiles if (folder / "quality.json").exists()]
    devices = sorted({json.loads((folder / "quality.json").read_text())["cpu_model"] for folder in folders})
    lines = [
        f"# Latency-predictor quality, {time.strftime('%Y-%m-%d')}",
        "",
        f"Devices: {', '.join(devices)}. Goal per row: >= {GOAL_WITHIN_10:.0%} within +-10% and at least the noise floor's share, "
        f"Kendall tau >= {GOAL_TAU}, from <= {GOAL_MEASUREMENTS} arch measurements in <= {GOAL_MINUTES:g} minutes.",
        "",
        "| space | target | predictor | held-out archs | within +-5% | within +-10% | MAPE | Kendall tau | goal |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for folder in folders:
        lines += rows(folder)
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
