"""Block families side by side: inherited accuracy (vision), MQAR recall (sequence) and latency (vision, fp32 and INT8).

    python benchmarks/block_families.py --part accuracy [--epochs 8] [--quick] [--families a,b] [--threads 1]
    python benchmarks/block_families.py --part mqar [--epochs 5] [--largest-only-epochs 3] [--kv-pairs 16] [--seq-len 64]
                                           [--num-train 12000] [--quick]
    python benchmarks/block_families.py --part latency [--target-macs N] [--samples 2000] [--rounds 3] [--remeasure] [--quick]

Every part derives, for each block family F, a *one-family space* from a hybrid space file (``search_spaces/
vision_hybrid.yaml`` for images, ``search_spaces/sequence_hybrid.yaml`` for sequences): the parsed YAML with only F's
entry kept in every stage's ``blocks`` and everything else as the file has it (then ``parse_config``).

``accuracy``: each one-family supernet is trained with ``nas.training.loop.train`` (the space's own training section,
``--epochs`` epochs, seed 0; the data split is the seed-0 split for every run) and the largest and smallest subnet are
scored with inherited weights after BN recalibration (the loop's ``final_metrics``: ``evaluate_arch`` on the run's
calibration batches), on the validation and the test split, with their parameters and MACs (``arch_cost``, batch 1).
Baselines: MBConv (one of the families) and the majority class of the training split; noise ceiling: MBConv trained
again with seed 1 (initialisation, batch order, subnet sampling, calibration batches), the difference in points.

``mqar``: the same for the sequence families at a harder multi-query associative recall setting than the space file
(``--kv-pairs`` key-value pairs at ``--seq-len`` tokens: more pairs than the small recurrent states have rows), with
the recurrent state size of the largest and smallest subnet (floats per sequence, all layers). The largest-only
warm-up (the space's ``training.largest_only_epochs``) is what gets the largest subnet off MQAR's plateau (guessing
among the keys' values): at 16 pairs and length 64 gated attention needed about 500 steps of it (12,000 sequences,
3 epochs), while 5,000 sequences x 3 epochs left it on the plateau for all 10 epochs. Baselines: chance
(1 / number of value tokens) and the noise ceiling (gated attention again with seed 1).

The accuracy part was sized on dev-2core: one epoch of a one-family supernet takes 1.3-4.5 s with one thread (two
threads, with another job on the second core, took up to 85 s), 16 epochs x 12 trainings about 10 minutes.

``latency``: for each image family a static network (``build_static``, random initial weights: they do not change the
work ONNX Runtime does) of the one-family space's arch whose MACs are nearest (in log) to a common target
(``--target-macs``, default the median over families of the largest subnet's MACs), picked from ``--samples`` random
archs plus the largest and smallest; exported to fp32 ONNX (``export_onnx``) and INT8 (``quantize_int8`` calibrated on
``int8_calibration_inputs`` of the training split, checked on the validation inputs: the search's conventions) and
measured with ``nas.latency.measure_latency``: every family's fp32 and INT8 model interleaved in one call per round,
``--rounds`` rounds. Reported: median of the per-round medians and p10s, the INT8 speed-up (fp32 / int8 median) with
its range over rounds, and ms per MMAC. Beside it: MBConv's two files measured a second time as separate candidates in
the same calls (noise ceiling) and the rank correlation of fp32 ms with MACs across families (the trivial baseline).
Run it on a quiet machine.

Results go to ``benchmarks/results/block_families/`` (``--quick``: its ``quick/`` folder): ``<part>.json`` and
``<part>.md``, with caches ``<part>_cache.json`` (one entry per trained family and seed, per exported family, per
measured round) and the supernet runs under ``runs/``: a killed run keeps every finished item and resumes the
training in progress from its last epoch.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import fcntl
import hashlib
import json
import math
import os
import platform
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from nas import jsonio
from nas.data.tasks import load_task_data
from nas.space.schema import RunConfig, parse_config
from nas.supernets.costs import arch_cost
from nas.supernets.space import Arch, SearchSpace
from nas.training.loop import train

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "block_families"
VISION_SPACE = ROOT / "search_spaces" / "vision_hybrid.yaml"
SEQUENCE_SPACE = ROOT / "search_spaces" / "sequence_hybrid.yaml"
CACHE_VERSION = 1
BASE_SEED = 0
NOISE_SEED = 1
VISION_BASELINE = "mbconv"
SEQUENCE_BASELINE = "gated_attention"
QUICK_FAMILIES = {"accuracy": ("mbconv", "pconv"), "latency": ("mbconv", "pconv"), "mqar": ("gated_attention", "gla")}

ZOOLOGY_NOTE = (
    "Zoology (Arora et al. 2023) and its follow-ups (Based, DeltaNet): attention solves MQAR at every size tried, "
    "while small-state recurrences (gated linear attention, SSMs) and gated convolutions (H3, Hyena) fail once the "
    "key-value pairs exceed what their state holds; accuracy tracks the state size. The delta rule (which overwrites "
    "the value stored under a key instead of adding to it) recalls better than GLA at equal state size."
)


def say(message: str) -> None:
    print(message, flush=True)


def digest(value: Any, length: int = 16) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, allow_nan=False).encode()).hexdigest()[:length]


class JsonCache:
    """Entries by key in one JSON file; every write takes a lock, re-reads the file, adds its entry and replaces the
    file atomically, so a killed run loses nothing."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> dict[str, Any]:
        if not self.path.is_file():
            return {}
        data = jsonio.loads(self.path.read_text())
        return dict(data["entries"]) if data.get("version") == CACHE_VERSION else {}

    def get(self, key: str) -> Any:
        return self.read().get(key)

    def put(self, key: str, value: Any) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            entries = {**self.read(), key: value}
            jsonio.write(self.path, {"version": CACHE_VERSION, "entries": entries}, nonfinite="error")


# ---------------------------------------------------------------------------------------------------- spaces


def space_families(data: dict[str, Any]) -> list[str]:
    """The block types that appear in every stage of the parsed space file, in the first stage's order."""
    first = [entry["type"] for entry in data["stages"][0]["blocks"]]
    return [name for name in first if all(any(entry["type"] == name for entry in stage["blocks"]) for stage in data["stages"])]


def one_family_data(data: dict[str, Any], family: str, *, training: dict[str, Any] | None = None, task: dict[str, Any] | None = None) -> dict[str, Any]:
    """A deep copy of the parsed space file with only ``family``'s entry in every stage's ``blocks``, its name
    suffixed with the family, and ``training`` / ``task`` keys replaced."""
    result = copy.deepcopy(data)
    result["name"] = f"{data['name']}_{family}"
    for stage in result["stages"]:
        stage["blocks"] = [entry for entry in stage["blocks"] if entry["type"] == family]
        if not stage["blocks"]:
            raise ValueError(f"{family!r} is not in every stage of {data['name']}")
    if training:
        result["training"] = {**result["training"], **training}
    if task:
        result["task"] = {**result["task"], **task}
    return result


def to_config(data: dict[str, Any], source: str) -> RunConfig:
    return parse_config(yaml.safe_dump(data, sort_keys=False), source)


def cost_of(space: SearchSpace, arch: Arch) -> dict[str, int]:
    params, macs = arch_cost(space, arch)
    return {"params": int(params), "macs": int(macs)}


# ---------------------------------------------------------------------------------------------------- training


def train_family(data: dict[str, Any], family: str, seed: int, out: Path, cache: JsonCache, part: str, task_data: Any, extra: Any = None) -> dict[str, Any]:
    """Train (or resume, or read from the cache) the one-family supernet of ``data`` with ``seed``; its largest and
    smallest subnet's inherited val / test accuracy, costs and wall seconds. A failure is returned as ``error``
    (not cached, so a re-run tries again)."""
    family_data = copy.deepcopy(data)
    family_data["training"]["seed"] = seed
    key = f"{part}/{family}/seed{seed}/{digest(family_data)}"
    cached = cache.get(key)
    if cached is not None:
        say(f"[{part}] {family} seed {seed}: cached ({cached['train_seconds']:.0f} s of training)")
        return cached
    started = time.perf_counter()
    run_dir = out / "runs" / part / f"{family}-seed{seed}-{key.rsplit('/', 1)[1][:8]}"
    try:
        config = to_config(family_data, f"block_families:{part}:{family}:seed{seed}")
        resume = (run_dir / "config.yaml").is_file()
        say(f"[{part}] {family} seed {seed}: training {config.training.epochs} epochs{' (resumed)' if resume else ''} in {run_dir.relative_to(out)}")
        result = train(config, run_dir, resume=resume, task_data=task_data)
        metrics = result.metrics
        space = config.space
        entry: dict[str, Any] = {"family": family, "seed": seed, "epochs": config.training.epochs}
        for which in ("largest", "smallest"):
            arch = getattr(space, which)()
            entry[which] = {
                "arch": arch.to_dict(),
                "name": arch.short_name(),
                "val": float(metrics[which]["val"]),
                "test": float(metrics[which]["test"]),
                **cost_of(space, arch),
                **(extra(space, arch) if extra else {}),
            }
        entry["train_seconds"] = float(metrics["train_seconds"])
        entry["call_seconds"] = time.perf_counter() - started
        log = run_dir / "log.jsonl"
        entry["train_accuracy_by_epoch"] = (
            [json.loads(line).get("train_accuracy") for line in log.read_text().splitlines() if line.strip()] if log.is_file() else None
        )
    except Exception as error:  # noqa: BLE001 - a family that fails is reported in the table, not dropped
        say(f"[{part}] {family} seed {seed}: FAILED {type(error).__name__}: {error}")
        return {"family": family, "seed": seed, "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc(limit=6)}
    cache.put(key, entry)
    say(
        f"[{part}] {family} seed {seed}: largest val/test {100 * entry['largest']['val']:.2f}/{100 * entry['largest']['test']:.2f}%, "
        f"smallest {100 * entry['smallest']['val']:.2f}/{100 * entry['smallest']['test']:.2f}% "
        f"({entry['train_seconds']:.0f} s training, {entry['call_seconds']:.0f} s in all)"
    )
    return entry


def noise_row(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """Absolute differences in points between two seeds' accuracies (None when either failed)."""
    if "error" in first or "error" in second:
        return {"error": first.get("error") or second.get("error")}
    return {f"{which}_{split}_points": 100 * abs(first[which][split] - second[which][split]) for which in ("largest", "smallest") for split in ("val", "test")}


# ---------------------------------------------------------------------------------------------------- formatting


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def mega(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value / 1e6:.{digits}f}"


def machine(threads: int) -> dict[str, Any]:
    from nas.latency.fingerprint import cpu_description

    model, flags = cpu_description()
    return {
        "cpu_model": model,
        "cpu_flags": list(flags),
        "logical_cores": os.cpu_count() or 1,
        "torch_threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def header(results: dict[str, Any], title: str) -> list[str]:
    m = results["machine"]
    return [
        f"# {title}, {results['date']}",
        "",
        f"`{results['command']}`; {m['cpu_model']}, {m['logical_cores']} logical cores, torch {m['torch']} with {m['torch_threads']} thread(s), "
        f"load average at the end {', '.join(f'{v:.1f}' for v in m['load_average_at_end'] or [])}; "
        f"{results['seconds_this_invocation']:.0f} s this invocation.",
        "",
    ]


def write_results(out: Path, part: str, results: dict[str, Any], table: str) -> None:
    jsonio.write(out / f"{part}.json", results, nonfinite="null")
    (out / f"{part}.md").write_text(table)
    say(table)


def accuracy_cells(entry: dict[str, Any]) -> str:
    if "error" in entry:
        return f"error: {entry['error'][:120]} | | | | | | | | |"
    large, small = entry["largest"], entry["smallest"]
    return (
        f"{percent(large['val'])} | {percent(large['test'])} | {percent(small['val'])} | {percent(small['test'])} | "
        f"{large['params'] / 1e3:.1f}k | {mega(large['macs'])} | {small['params'] / 1e3:.1f}k | {mega(small['macs'])} | {entry['train_seconds']:.0f}"
    )


# ---------------------------------------------------------------------------------------------------- part: accuracy


def part_accuracy(args: argparse.Namespace, out: Path) -> tuple[dict[str, Any], str]:
    data = yaml.safe_load(VISION_SPACE.read_text())
    families = select_families(args, data, "accuracy")
    epochs = 1 if args.quick else args.epochs
    training = {"epochs": epochs, "warmup_epochs": min(int(data["training"].get("warmup_epochs", 0)), max(epochs - 1, 0)), "seed": BASE_SEED}
    cache = JsonCache(out / "accuracy_cache.json")
    base = to_config(one_family_data(data, families[0], training=training), "block_families:accuracy")
    task_data = load_task_data(base.task, base.space, seed=BASE_SEED)
    majority_class = int(torch.bincount(task_data.train.targets).argmax())
    majority = {split: float((getattr(task_data, split).targets == majority_class).float().mean()) for split in ("val", "test")}
    say(
        f"[accuracy] {len(families)} families, {epochs} epochs each, batch {data['training']['batch_size']}, "
        f"{len(task_data.train.targets)} / {len(task_data.val.targets)} / {len(task_data.test.targets)} train / val / test examples"
    )
    rows = {}
    for index, family in enumerate(families):
        say(f"[accuracy] family {index + 1}/{len(families)}: {family}")
        rows[family] = train_family(one_family_data(data, family, training=training), family, BASE_SEED, out, cache, "accuracy", task_data)
    noise_family = VISION_BASELINE if VISION_BASELINE in families else families[0]
    say(f"[accuracy] noise ceiling: {noise_family} with seed {NOISE_SEED}")
    second = train_family(one_family_data(data, noise_family, training=training), noise_family, NOISE_SEED, out, cache, "accuracy", task_data)
    results = {
        "benchmark": "block_families",
        "part": "accuracy",
        "space_file": str(VISION_SPACE.relative_to(ROOT)),
        "epochs": epochs,
        "training": {**data["training"], **training},
        "split_sizes": {split: len(getattr(task_data, split).targets) for split in ("train", "val", "test")},
        "families": rows,
        "baseline": {"family": noise_family, "majority_class": majority_class, "majority_accuracy": majority},
        "noise_ceiling": {"family": noise_family, "seed": NOISE_SEED, "second_seed": second, "difference": noise_row(rows[noise_family], second)},
    }
    return results, accuracy_markdown


def accuracy_markdown(results: dict[str, Any]) -> str:
    lines = header(results, "Block families: inherited accuracy on vision_hybrid one-family spaces")
    sizes = results["split_sizes"]
    lines += [
        f"Each family's one-family space of `{results['space_file']}` trained with the space's own training section "
        f"(strategy {results['training']['strategy']}) for **{results['epochs']} epochs**, seed {BASE_SEED}; inherited weights after BN "
        f"recalibration; digits at 16x16, {sizes['train']} / {sizes['val']} / {sizes['test']} train / val / test examples. "
        "MACs at batch 1, in millions.",
        "",
        "| family | largest val | largest test | smallest val | smallest test | largest params | largest MMACs | smallest params | smallest MMACs "
        "| train (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for family, entry in results["families"].items():
        mark = " (baseline)" if family == results["baseline"]["family"] else ""
        lines.append(f"| {family}{mark} | {accuracy_cells(entry)} |")
    majority = results["baseline"]["majority_accuracy"]
    lines.append(
        f"| majority class ({results['baseline']['majority_class']}) | {percent(majority['val'])} | {percent(majority['test'])} | "
        f"{percent(majority['val'])} | {percent(majority['test'])} | | | | | |"
    )
    noise = results["noise_ceiling"]
    lines.append(f"| {noise['family']}, seed {noise['seed']} | {accuracy_cells(noise['second_seed'])} |")
    difference = noise["difference"]
    if "error" in difference:
        lines.append(f"| noise ceiling: |seed 1 - seed 0| | error: {difference['error'][:120]} | | | | | | | | |")
    else:
        lines.append(
            "| noise ceiling: abs(seed 1 - seed 0), points | "
            + " | ".join(f"{difference[f'{w}_{s}_points']:.2f}" for w in ("largest", "smallest") for s in ("val", "test"))
            + " | | | | | |"
        )
    lines.append("")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- part: mqar


def state_floats(space: SearchSpace, arch: Arch, length: int) -> dict[str, Any]:
    """Floats a subnet carries per sequence at inference (all layers): attention's KV cache grows with the length
    (L x H x (qk + v) per layer), GLA's state is H x K x V, the delta rule's H x D x D, SLA's H x D x D (plus a
    normaliser of H x D), TCNCA's the causal convolutions' buffers ((k - 1) x dilation x width per layer) plus the
    KV cache of one chunk."""
    total = 0
    kinds = set()
    for stage in arch.stages:
        for config in stage.blocks:
            values = config if isinstance(config, dict) else {name: getattr(config, name) for name in getattr(config, "__dataclass_fields__", {})}
            name = type(config).__name__
            heads = int(values.get("num_heads", 1))
            if name == "GatedAttentionConfig":
                head_dim = int(values["head_dim"])
                qk = max(1, round(head_dim * float(values.get("qk_ratio", 1.0))))
                total += length * heads * (qk + head_dim)
                kinds.add("KV cache, grows with length")
            elif name == "GLAConfig":
                total += heads * int(values["key_dim"]) * int(values["value_dim"])
                kinds.add("H*K*V")
            elif name == "DeltaNetConfig":
                total += heads * int(values["head_dim"]) ** 2
                kinds.add("H*D*D")
            elif name == "SLAConfig":
                total += heads * int(values["head_dim"]) ** 2 + heads * int(values["head_dim"])
                kinds.add("H*D*D + H*D")
            elif name == "TCNCAConfig":
                kernel, depth = int(values["kernel_size"]), int(values["tcn_depth"])
                conv = sum((kernel - 1) * 2**layer * stage.width for layer in range(depth))
                chunk = min(int(values["chunk_size"]), length)
                total += conv + 2 * chunk * heads * int(values["head_dim"])
                kinds.add("conv buffers + KV cache of one chunk")
            else:
                kinds.add(f"unknown ({name})")
    return {"state_floats": int(total), "state_kind": ", ".join(sorted(kinds))}


def part_mqar(args: argparse.Namespace, out: Path) -> tuple[dict[str, Any], str]:
    data = yaml.safe_load(SEQUENCE_SPACE.read_text())
    families = select_families(args, data, "mqar")
    epochs = 2 if args.quick else args.epochs
    length, pairs = (32, 8) if args.quick else (args.seq_len, args.kv_pairs)
    vocab = int(data["task"]["vocab_size"])
    task = {
        "input_shape": [length],
        "num_kv_pairs": pairs,
        "num_train": 256 if args.quick else args.num_train,
        "num_val": 64 if args.quick else args.num_val,
        "num_test": 64 if args.quick else args.num_test,
    }
    largest_only = 1 if args.quick else args.largest_only_epochs
    if largest_only >= epochs:
        raise SystemExit(f"--largest-only-epochs ({largest_only}) must be below --epochs ({epochs})")
    training = {
        "epochs": epochs,
        "warmup_epochs": min(int(data["training"].get("warmup_epochs", 0)), max(epochs - 1, 0)),
        "largest_only_epochs": largest_only,
        "seed": BASE_SEED,
    }
    for key, value in (("batch_size", args.batch_size), ("lr", args.lr)):
        if value is not None:
            training[key] = value

    def derive(family: str) -> dict[str, Any]:
        derived = one_family_data(data, family, training=training, task=task)
        derived["sequence_length"] = [length]
        return derived

    cache = JsonCache(out / "mqar_cache.json")
    base = to_config(derive(families[0]), "block_families:mqar")
    task_data = load_task_data(base.task, base.space, seed=BASE_SEED)
    say(
        f"[mqar] {len(families)} families, {epochs} epochs ({largest_only} largest-only), {pairs} key-value pairs at length {length}, "
        f"vocabulary {vocab}, {task['num_train']} / {task['num_val']} / {task['num_test']} train / val / test sequences"
    )

    def extra(space: SearchSpace, arch: Arch) -> dict[str, Any]:
        return state_floats(space, arch, length)

    rows = {}
    for index, family in enumerate(families):
        say(f"[mqar] family {index + 1}/{len(families)}: {family}")
        rows[family] = train_family(derive(family), family, BASE_SEED, out, cache, "mqar", task_data, extra)
    noise_family = SEQUENCE_BASELINE if SEQUENCE_BASELINE in families else families[0]
    say(f"[mqar] noise ceiling: {noise_family} with seed {NOISE_SEED}")
    second = train_family(derive(noise_family), noise_family, NOISE_SEED, out, cache, "mqar", task_data, extra)
    values = vocab - vocab // 2
    results = {
        "benchmark": "block_families",
        "part": "mqar",
        "space_file": str(SEQUENCE_SPACE.relative_to(ROOT)),
        "epochs": epochs,
        "task": {**data["task"], **task, "sequence_length": length},
        "file_task": data["task"],
        "training": {**data["training"], **training},
        "families": rows,
        "baseline": {"chance_accuracy": 1 / values, "value_tokens": values},
        "noise_ceiling": {"family": noise_family, "seed": NOISE_SEED, "second_seed": second, "difference": noise_row(rows[noise_family], second)},
        "zoology_note": ZOOLOGY_NOTE,
        "ordering": mqar_ordering(rows),
    }
    return results, mqar_markdown


def mqar_ordering(rows: dict[str, Any]) -> dict[str, Any]:
    """The families ordered by the largest subnet's held-out accuracy (val and test pooled by mean), and whether the
    three Zoology claims hold: attention first (within 1 point of the best), delta rule above GLA, and the
    small-state families (GLA, SLA) below attention by more than 5 points."""
    scores = {family: (entry["largest"]["val"] + entry["largest"]["test"]) / 2 for family, entry in rows.items() if "error" not in entry}
    order = sorted(scores, key=lambda family: -scores[family])
    checks: dict[str, Any] = {}
    if "gated_attention" in scores:
        checks["attention_solves_or_leads"] = scores["gated_attention"] >= max(scores.values()) - 0.01
        for small in ("gla", "sla"):
            if small in scores:
                checks[f"{small}_fails_vs_attention"] = scores[small] < scores["gated_attention"] - 0.05
    if "delta_net" in scores and "gla" in scores:
        checks["delta_above_gla"] = scores["delta_net"] > scores["gla"]
    return {"by_largest_accuracy": order, "scores": scores, "checks": checks}


def mqar_markdown(results: dict[str, Any]) -> str:
    task = results["task"]
    lines = header(results, "Block families: MQAR recall on sequence_hybrid one-family spaces")
    lines += [
        f"Each family's one-family space of `{results['space_file']}` at a harder MQAR than the file: **{task['num_kv_pairs']} key-value "
        f"pairs at length {task['sequence_length']}** (vocabulary {task['vocab_size']}; the file has {results['file_task']['num_kv_pairs']} pairs at "
        f"{results['file_task']['input_shape'][0]}), "
        f"{task['num_train']} / {task['num_val']} / {task['num_test']} train / val / test sequences; the space's training section "
        f"for **{results['epochs']} epochs** ({results['training']['largest_only_epochs']} largest-only), batch {results['training']['batch_size']}, "
        f"lr {results['training']['lr']}, seed {BASE_SEED}. Accuracy over query positions, inherited weights after BN recalibration. "
        "State: floats per sequence at inference over all layers.",
        "",
        "| family | largest val | largest test | smallest val | smallest test | largest state | smallest state | state form | largest params "
        "| largest MMACs | train (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cells(entry: dict[str, Any]) -> str:
        if "error" in entry:
            return f"error: {entry['error'][:120]} | | | | | | | | | |"
        large, small = entry["largest"], entry["smallest"]
        return (
            f"{percent(large['val'])} | {percent(large['test'])} | {percent(small['val'])} | {percent(small['test'])} | "
            f"{large['state_floats']:,} | {small['state_floats']:,} | {large['state_kind']} | {large['params'] / 1e3:.1f}k | {mega(large['macs'])} | "
            f"{entry['train_seconds']:.0f}"
        )

    for family, entry in results["families"].items():
        lines.append(f"| {family} | {cells(entry)} |")
    chance = results["baseline"]["chance_accuracy"]
    lines.append(
        f"| chance (1/{results['baseline']['value_tokens']} value tokens) | "
        f"{percent(chance)} | {percent(chance)} | {percent(chance)} | {percent(chance)} | | | | | | |"
    )
    noise = results["noise_ceiling"]
    lines.append(f"| {noise['family']}, seed {noise['seed']} | {cells(noise['second_seed'])} |")
    difference = noise["difference"]
    if "error" not in difference:
        lines.append(
            "| noise ceiling: abs(seed 1 - seed 0), points | "
            + " | ".join(f"{difference[f'{w}_{s}_points']:.2f}" for w in ("largest", "smallest") for s in ("val", "test"))
            + " | | | | | | |"
        )
    ordering = results["ordering"]
    lines += [
        "",
        f"Zoology's finding: {results['zoology_note']}",
        "",
        "Our ordering by the largest subnet's accuracy (mean of val and test): "
        + " > ".join(f"{family} ({100 * ordering['scores'][family]:.1f}%)" for family in ordering["by_largest_accuracy"])
        + ". Checks: "
        + (", ".join(f"{name}: {'yes' if value else 'NO'}" for name, value in ordering["checks"].items()) or "none applicable")
        + ".",
        "",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- part: latency


def nearest_arch(space: SearchSpace, target_macs: float, samples: int, seed: int) -> tuple[Arch, int, int, int]:
    """The arch whose MACs are nearest to ``target_macs`` in log among ``samples`` random draws plus the largest and
    smallest: (arch, params, MACs, distinct archs considered)."""
    from nas.predictors.arch_costs import ArchCosts

    costs = ArchCosts.for_space(space)
    rng = np.random.default_rng(seed)
    pool: dict[Arch, None] = {space.largest(): None, space.smallest(): None}
    for _ in range(samples):
        pool[space.sample(rng)] = None
    best, best_distance, best_cost = None, math.inf, (0, 0)
    for arch in pool:
        params, macs = costs.cost(arch)
        distance = abs(math.log(max(macs, 1)) - math.log(target_macs))
        if distance < best_distance:
            best, best_distance, best_cost = arch, distance, (int(params), int(macs))
    assert best is not None
    return best, best_cost[0], best_cost[1], len(pool)


def export_family(space: SearchSpace, family: str, arch: Arch, task_data: Any, folder: Path) -> dict[str, Any]:
    """fp32 and INT8 ONNX files of ``build_static(space, arch)`` (seeded random weights, BN statistics calibrated
    on the run's calibration batches as the search does), with the search's export conventions."""
    from nas.export import onnx
    from nas.export.subnet import int8_calibration_inputs
    from nas.supernets.supernet import build_static
    from nas.training.evaluation import calibration_batches, prepare_batch

    torch.manual_seed(BASE_SEED)
    static = build_static(space, arch)
    norms = [module for module in static.modules() if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)]
    if norms:
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None
        static.train()
        with torch.no_grad():
            for inputs in calibration_batches(task_data.train, batch_size=128, num_batches=4, seed=BASE_SEED):
                static(prepare_batch(inputs, inputs, arch)[0])
    static.eval()
    inputs = int8_calibration_inputs(task_data.train)
    calibration = prepare_batch(inputs, inputs, arch)[0]
    validation = prepare_batch(task_data.val.inputs, task_data.val.targets, arch)[0]
    folder.mkdir(parents=True, exist_ok=True)
    fp32_path, int8_path = folder / "model.onnx", folder / "model.int8.onnx"
    result = onnx.export_onnx(static, calibration[:2], fp32_path, arch=arch, space_name=space.name, check_inputs=validation[:16])
    quantized = onnx.quantize_int8(fp32_path, int8_path, calibration=calibration, validation=validation, min_agreement=0.0)
    return {
        "fp32_path": str(fp32_path),
        "int8_path": str(int8_path),
        "fp32_max_abs_error": float(result.max_abs_error),
        "int8_top1_agreement": float(quantized.int8_top1_agreement or 0.0),
        "int8_agreement_below_search_minimum": bool((quantized.int8_top1_agreement or 0.0) < onnx.MIN_INT8_AGREEMENT),
    }


def part_latency(args: argparse.Namespace, out: Path) -> tuple[dict[str, Any], str]:
    from nas.latency.protocol import measure_latency
    from nas.latency.targets import resolve_target

    data = yaml.safe_load(VISION_SPACE.read_text())
    families = select_families(args, data, "latency")
    samples = 200 if args.quick else args.samples
    rounds = 1 if args.quick else args.rounds
    max_seconds = 1.0 if args.quick else args.max_seconds
    cache = JsonCache(out / "latency_cache.json")
    spaces = {family: to_config(one_family_data(data, family), f"block_families:latency:{family}").space for family in families}
    base = to_config(one_family_data(data, families[0]), "block_families:latency")
    task_data = load_task_data(base.task, base.space, seed=BASE_SEED)

    largest_macs = {}
    for family, space in spaces.items():
        key = f"largest_macs/{family}/{digest(one_family_data(data, family))}"
        value = cache.get(key)
        if value is None:
            value = cost_of(space, space.largest())["macs"]
            cache.put(key, value)
        largest_macs[family] = value
    target = float(args.target_macs) if args.target_macs else float(np.median(list(largest_macs.values())))
    say(f"[latency] {len(families)} families; target {target / 1e6:.3f} MMACs ({'given' if args.target_macs else 'median of the largest subnets'})")

    rows: dict[str, Any] = {}
    for index, family in enumerate(families):
        space = spaces[family]
        key = f"export/{family}/{digest({'space': one_family_data(data, family), 'target': target, 'samples': samples})}"
        entry = cache.get(key)
        if entry is not None and Path(entry.get("fp32_path", "")).is_file() and Path(entry.get("int8_path", "")).is_file():
            rows[family] = entry
            say(f"[latency] {index + 1}/{len(families)} {family}: cached export ({entry['macs'] / 1e6:.3f} MMACs)")
            continue
        started = time.perf_counter()
        try:
            arch, params, macs, considered = nearest_arch(space, target, samples, seed=BASE_SEED)
            exported = export_family(space, family, arch, task_data, out / "exports" / family / key.rsplit("/", 1)[1][:8])
            entry = {
                "family": family,
                "arch": arch.to_dict(),
                "name": arch.short_name(),
                "params": params,
                "macs": macs,
                "archs_considered": considered,
                "macs_vs_target": macs / target,
                **exported,
                "seconds": time.perf_counter() - started,
            }
        except Exception as error:  # noqa: BLE001 - recorded in the table
            say(f"[latency] {family}: FAILED {type(error).__name__}: {error}")
            rows[family] = {"family": family, "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc(limit=6)}
            continue
        cache.put(key, entry)
        rows[family] = entry
        say(
            f"[latency] {index + 1}/{len(families)} {family}: {macs / 1e6:.3f} MMACs ({macs / target:.2f}x target), {params / 1e3:.1f}k params, "
            f"INT8 agreement {entry['int8_top1_agreement']:.3f} ({entry['seconds']:.1f} s)"
        )

    exported = [family for family in families if "error" not in rows[family]]
    fp32_target = resolve_target("cpu_fp32", threads=args.threads)
    int8_target = resolve_target("cpu_int8", threads=args.threads)
    noise_family = VISION_BASELINE if VISION_BASELINE in exported else (exported[0] if exported else None)
    models: dict[str, str] = {}
    targets = {}
    for family in exported:
        for kind, target_of in (("fp32", fp32_target), ("int8", int8_target)):
            models[f"{family}/{kind}"] = rows[family][f"{kind}_path"]
            targets[f"{family}/{kind}"] = target_of
            if family == noise_family:
                models[f"{family}#2/{kind}"] = rows[family][f"{kind}_path"]
                targets[f"{family}#2/{kind}"] = target_of
    measured_rounds = []
    identity = digest(
        {
            "models": {name: rows[name.split("/")[0].split("#")[0]]["macs"] for name in models},
            "max_seconds": max_seconds,
            "threads": args.threads,
            "exports": [rows[f].get("fp32_path") for f in exported],
        }
    )
    for round_index in range(rounds if models else 0):
        key = f"round/{identity}/{round_index}"
        cached = None if args.remeasure else cache.get(key)
        if cached is not None:
            measured_rounds.append(cached)
            say(f"[latency] round {round_index + 1}/{rounds}: cached (--remeasure measures again)")
            continue
        started = time.perf_counter()
        measurements = measure_latency(models, targets, max_seconds=max_seconds, seed=round_index)
        result = {name: {k: v for k, v in measurement.to_dict().items() if k != "fingerprint"} for name, measurement in measurements.items()}
        fingerprints = {name.split("/")[1]: measurement.fingerprint for name, measurement in measurements.items()}
        entry = {
            "measurements": result,
            "fingerprints": json.loads(jsonio.dumps(fingerprints)),
            "seconds": time.perf_counter() - started,
            "load_average": list(os.getloadavg()),
        }
        cache.put(key, entry)
        measured_rounds.append(entry)
        say(f"[latency] round {round_index + 1}/{rounds}: {len(models)} models interleaved in {entry['seconds']:.1f} s")

    def summary(name: str) -> dict[str, Any]:
        medians = [r["measurements"][name]["median_ms"] for r in measured_rounds]
        p10s = [r["measurements"][name]["p10_ms"] for r in measured_rounds]
        return {
            "median_ms": float(np.median(medians)),
            "p10_ms": float(np.median(p10s)),
            "median_ms_rounds": medians,
            "cv_rounds": [r["measurements"][name]["cv"] for r in measured_rounds],
            "stable_rounds": sum(bool(r["measurements"][name]["stable"]) for r in measured_rounds),
        }

    for family in exported if measured_rounds else []:
        fp32, int8 = summary(f"{family}/fp32"), summary(f"{family}/int8")
        speedups = [a / b for a, b in zip(fp32["median_ms_rounds"], int8["median_ms_rounds"], strict=True)]
        rows[family].update(
            fp32=fp32,
            int8=int8,
            int8_speedup=float(np.median(speedups)),
            int8_speedup_range=[float(min(speedups)), float(max(speedups))],
            fp32_ms_per_mmac=fp32["median_ms"] / (rows[family]["macs"] / 1e6),
            int8_ms_per_mmac=int8["median_ms"] / (rows[family]["macs"] / 1e6),
        )
    noise: dict[str, Any] = {"family": noise_family}
    if noise_family and measured_rounds:
        for kind in ("fp32", "int8"):
            first, second = summary(f"{noise_family}/{kind}"), summary(f"{noise_family}#2/{kind}")
            ratios = [a / b for a, b in zip(first["median_ms_rounds"], second["median_ms_rounds"], strict=True)]
            noise[kind] = {
                "second_median_ms": second["median_ms"],
                "second_p10_ms": second["p10_ms"],
                "ratio_first_over_second": float(np.median(ratios)),
                "ratio_range": [min(ratios), max(ratios)],
            }
    baseline: dict[str, Any] = {}
    measured = [family for family in exported if "fp32" in rows[family]]
    if len(measured) >= 2:
        from scipy import stats

        macs = [rows[f]["macs"] for f in measured]
        for kind in ("fp32", "int8"):
            ms = [rows[f][kind]["median_ms"] for f in measured]
            baseline[kind] = {
                "spearman_rho_ms_vs_macs": float(stats.spearmanr(macs, ms).statistic),
                "kendall_tau_ms_vs_macs": float(stats.kendalltau(macs, ms).statistic),
                "order_by_ms": [measured[i] for i in np.argsort(ms, kind="stable")],
            }
        baseline["order_by_macs"] = [measured[i] for i in np.argsort(macs, kind="stable")]
        baseline["macs_range"] = [min(macs) / target, max(macs) / target]
    results = {
        "benchmark": "block_families",
        "part": "latency",
        "space_file": str(VISION_SPACE.relative_to(ROOT)),
        "target_macs": target,
        "target_from": "--target-macs" if args.target_macs else "median of the largest subnets' MACs",
        "largest_macs": largest_macs,
        "samples": samples,
        "rounds": rounds,
        "max_seconds_per_round": max_seconds,
        "threads": args.threads,
        "families": rows,
        "noise_ceiling": noise,
        "baseline_macs_ranking": baseline,
        "fingerprint": measured_rounds[0]["fingerprints"] if measured_rounds else None,
    }
    return results, latency_markdown


def latency_markdown(results: dict[str, Any]) -> str:
    lines = header(results, "Block families: fp32 and INT8 latency at a common MAC budget")
    lines += [
        f"One static net per family from its one-family space of `{results['space_file']}`: the arch nearest (log MACs) to "
        f"**{results['target_macs'] / 1e6:.3f} MMACs** ({results['target_from']}) among {results['samples']} random archs plus the largest "
        f"and smallest; random weights, BN statistics from 4 training batches. fp32 ONNX + INT8 QDQ (search conventions), ONNX Runtime "
        f"CPU, {results['threads']} thread(s), batch 1; all models interleaved in one `measure_latency` call per round, "
        f"{results['rounds']} round(s) of up to {results['max_seconds_per_round']:.0f} s; ms = median over rounds of the round's median "
        "(p10 likewise); speed-up = fp32 / INT8 median, median over rounds [min, max].",
        "",
        "| family | MMACs | params | fp32 ms (p10) | INT8 ms (p10) | INT8 speed-up [range] | fp32 ms / MMAC | INT8 ms / MMAC | INT8 agreement |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for family, row in results["families"].items():
        if "error" in row:
            lines.append(f"| {family} | error: {row['error'][:160]} | | | | | | | |")
            continue
        if "fp32" not in row:
            lines.append(f"| {family} | {mega(row['macs'])} | {row['params'] / 1e3:.1f}k | not measured | | | | | |")
            continue
        low, high = row["int8_speedup_range"]
        lines.append(
            f"| {family} | {mega(row['macs'])} | {row['params'] / 1e3:.1f}k | {row['fp32']['median_ms']:.4f} ({row['fp32']['p10_ms']:.4f}) | "
            f"{row['int8']['median_ms']:.4f} ({row['int8']['p10_ms']:.4f}) | {row['int8_speedup']:.2f}x [{low:.2f}, {high:.2f}] | "
            f"{row['fp32_ms_per_mmac']:.3f} | {row['int8_ms_per_mmac']:.3f} | {row['int8_top1_agreement']:.3f} |"
        )
    noise = results["noise_ceiling"]
    if "fp32" in noise:
        lines.append(
            f"| noise ceiling: {noise['family']} measured again | | | {noise['fp32']['second_median_ms']:.4f} ({noise['fp32']['second_p10_ms']:.4f}) | "
            f"{noise['int8']['second_median_ms']:.4f} ({noise['int8']['second_p10_ms']:.4f}) | "
            f"first/second: fp32 {noise['fp32']['ratio_first_over_second']:.3f}, "
            f"INT8 {noise['int8']['ratio_first_over_second']:.3f} | | | |"
        )
    baseline = results["baseline_macs_ranking"]
    if baseline:
        lines += [
            "",
            f"Baseline, ranking by MACs alone (MACs span {baseline['macs_range'][0]:.2f}-{baseline['macs_range'][1]:.2f}x the target): "
            f"Spearman rho of ms with MACs across families: fp32 {baseline['fp32']['spearman_rho_ms_vs_macs']:.2f}, "
            f"INT8 {baseline['int8']['spearman_rho_ms_vs_macs']:.2f} (Kendall tau {baseline['fp32']['kendall_tau_ms_vs_macs']:.2f} / "
            f"{baseline['int8']['kendall_tau_ms_vs_macs']:.2f}).",
            f"- by MACs: {' < '.join(baseline['order_by_macs'])}",
            f"- by fp32 ms: {' < '.join(baseline['fp32']['order_by_ms'])}",
            f"- by INT8 ms: {' < '.join(baseline['int8']['order_by_ms'])}",
        ]
    lines.append("")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- main


def select_families(args: argparse.Namespace, data: dict[str, Any], part: str) -> list[str]:
    available = space_families(data)
    if args.families:
        wanted = args.families.split(",")
        unknown = sorted(set(wanted) - set(available))
        if unknown:
            raise SystemExit(f"--families: unknown {unknown}; families of this part: {available}")
        return wanted
    if args.quick:
        return [family for family in QUICK_FAMILIES[part] if family in available]
    return available


PARTS = {"accuracy": part_accuracy, "mqar": part_mqar, "latency": part_latency}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--part", choices=sorted(PARTS), required=True)
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 families, tiny epochs / data / rounds (under a minute)")
    parser.add_argument("--families", help="comma-separated families (default: every family of the part's space)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results and caches (default: %(default)s; with --quick its quick/ folder)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads for training; ONNX Runtime threads for latency (default 1)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (accuracy default 8, mqar default 5)")
    parser.add_argument("--kv-pairs", type=int, default=16, help="mqar: key-value pairs (default %(default)s)")
    parser.add_argument("--seq-len", type=int, default=64, help="mqar: sequence length (default %(default)s)")
    parser.add_argument("--num-train", type=int, default=12000, help="mqar: training sequences (default %(default)s)")
    parser.add_argument("--num-val", type=int, default=500, help="mqar: validation sequences (default %(default)s)")
    parser.add_argument("--num-test", type=int, default=1000, help="mqar: test sequences (default %(default)s)")
    parser.add_argument(
        "--largest-only-epochs",
        type=int,
        default=3,
        help="mqar: largest-only warm-up epochs (the space's training.largest_only_epochs, 4 of 14 there; default %(default)s)",
    )
    parser.add_argument("--batch-size", type=int, default=None, help="mqar: override the space's batch size")
    parser.add_argument("--lr", type=float, default=None, help="mqar: override the space's learning rate")
    parser.add_argument("--target-macs", type=float, default=None, help="latency: common MAC target (default: median of the largest subnets' MACs)")
    parser.add_argument("--samples", type=int, default=2000, help="latency: random archs searched per family (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="latency: interleaved measurement rounds (default %(default)s)")
    parser.add_argument("--remeasure", action="store_true", help="latency: measure every round again instead of reading cached rounds")
    parser.add_argument("--max-seconds", type=float, default=20.0, help="latency: cap of each round's interleaved phase (default %(default)s)")
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = {"accuracy": 8, "mqar": 5}.get(args.part, 0)
    out = DEFAULT_OUT / "quick" if args.quick and args.out == DEFAULT_OUT else args.out
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    try:
        results, render = PARTS[args.part](args, out)
    finally:
        torch.set_num_threads(threads)
    results = {
        **results,
        "setting": "quick" if args.quick else "full",
        "date": datetime.date.today().isoformat(),
        "machine": machine(args.threads),
        "command": " ".join(["python", "benchmarks/block_families.py", *(argv if argv is not None else sys.argv[1:])]),
        "seconds_this_invocation": time.perf_counter() - started,
    }
    write_results(out, args.part, results, render(results))
    return results


if __name__ == "__main__":
    main()
