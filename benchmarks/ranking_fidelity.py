"""Ranking fidelity: how well each training method's inherited accuracy ranks subnets against stand-alone training.

    python benchmarks/ranking_fidelity.py [--methods sandwich,...] [--tasks digits,mqar] [--quick] [--out DIR]
                                          [--set METHOD.OPTION=VALUE ...] [--ground-truth-only] [--threads 1]

For each task a fixed set of subnets is drawn from the task's space, stratified by MACs (the smallest and largest
subnet plus the pool members nearest to evenly spaced log-MACs targets). Ground truth: every one of them trained
stand-alone (a freshly initialised ``build_static`` network, the supernet runs' optimizer, warm-up + cosine
schedule, epochs, batch size and augmentation), with two seeds; the reference accuracy is their mean. For every
method (each name in ``STRATEGIES``, or ``--methods``) the supernet is trained once with ``nas.training.loop.train``
(``training.strategy`` set to the method, every method at the same epochs), and each subnet is scored with its
inherited weights after BN recalibration (``evaluate_arch`` on ``run_calibration_batches``: what the search does).
All accuracies are top-1 on the held-out split: validation and test together (MQAR: query positions only).

Reported per method: Kendall tau (with a 95% bootstrap interval, subnets resampled) and Spearman rho between
inherited and stand-alone accuracy, top-5 overlap, mean absolute gap, the inherited accuracy of the largest and
smallest subnet, training wall seconds (the loop's own epoch time) and optimizer steps and subnet passes (counted
from the strategy's per-step tasks). Baseline rows: ranking by MACs alone, by parameters alone, and the noise
ceiling (tau between the two stand-alone seeds). A table (``results.md``) and ``results.json`` go to ``--out``
(default ``benchmarks/results/ranking_fidelity/``) with the date, the machine and the settings.

Everything expensive is cached under ``--out`` and a killed run loses nothing: the subnet samples
(``samples.json``), each stand-alone training (``standalone.json``, keyed by task, arch, recipe and seed), each
method's row (``methods.json``, keyed by task, method, the run's space file, the sample and the source of the
strategy's module, so a changed strategy is trained again) and the supernet runs (``runs/<task>/<method>-<digest>/``,
resumed from their last epoch). Re-running the same command computes only what is missing: the default (every
registered strategy) adds the rows of new strategies. Processes may share one ``--out``: cache files are locked and
merged on every write, and a method whose supernet another process is training is left out of this invocation's
table with a message.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import fcntl
import hashlib
import inspect
import json
import math
import os
import platform
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from scipy import stats

from nas import jsonio
from nas.data.splits import Split, TaskData, iterate_batches
from nas.data.tasks import load_task_data
from nas.latency.fingerprint import cpu_description
from nas.predictors.arch_costs import ArchCosts
from nas.run_dir import RunDir
from nas.run_lock import RunBusyError
from nas.space.schema import RunConfig, parse_config
from nas.supernets.space import Arch, SearchSpace
from nas.supernets.strategies import STRATEGIES, Schedule, SubnetTask
from nas.supernets.supernet import build_static
from nas.training.checkpoint import load_run
from nas.training.evaluation import accuracy, evaluate_arch, prepare_batch, run_calibration_batches
from nas.training.loop import augment, build_strategy, epoch_seed, make_optimizer, task_loss, train

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "ranking_fidelity"
CACHE_VERSION = 1
STANDALONE_SEEDS = (0, 1)
"""Seeds of the two stand-alone trainings of every subnet (initialisation, batch order, augmentation)."""
BOOTSTRAP_RESAMPLES = 2000
TOP_K = 5
SPREAD_GOAL_POINTS = 5.0

REFERENCE_POINTS = (
    ("NAS-Bench-201, weight-sharing supernet (one-shot)", "0.50-0.55"),
    ("NAS-Bench-201, few-shot NAS", "0.61"),
    ("NAS-Bench-201, best re-implementation", "0.69"),
    ("goal: best method on both tasks", ">= 0.80"),
)

DIGITS_SPACE: dict[str, Any] = {
    "name": "ranking_digits",
    "task": {"dataset": "digits", "input_shape": [1, 8, 8], "num_classes": 10},
    "stem": {"channels": 8, "kernel_size": 3, "stride": 1, "activation": "relu"},
    "stages": [
        {
            "depth": [1, 2],
            "width": [4, 8, 12],
            "stride": 2,
            "blocks": [{"type": "mbconv", "kernel_size": [3, 5], "expand_ratio": [1, 2, 4], "activation": "relu", "squeeze_excite": False}],
        },
        {
            "depth": [1, 2],
            "width": [8, 16, 24],
            "stride": 2,
            "blocks": [{"type": "mbconv", "kernel_size": [3, 5], "expand_ratio": [1, 2, 4], "activation": "hard_swish", "squeeze_excite": [False, True]}],
        },
    ],
    "head": {"channels": [32], "dropout": 0.0, "activation": "hard_swish"},
    "resolution": [4, 6, 8],
    "training": {
        "epochs": 40,
        "batch_size": 64,
        "optimizer": "adamw",
        "lr": 0.006,
        "weight_decay": 0.02,
        "warmup_epochs": 2,
        "augment": True,
        "seed": 0,
    },
}
"""Scikit-learn's 8x8 digits at 4, 6 and 8 pixels, with two narrow MBConv stages: small enough that resolution and
width change what a subnet can learn. ``expand_ratio: 1`` drops the expansion conv, so in the supernet the shared
depthwise weights see the block's input in some subnets and expanded features in others; the sandwich rule's eight
largest inherited-accuracy gaps (21-33 points) were all on subnets with ratio-1 blocks (but so were 34 of the 38
middle subnets, so this is a suspicion, not a measurement)."""

MQAR_SPACE: dict[str, Any] = {
    "name": "ranking_mqar",
    "task": {
        "dataset": "mqar",
        "input_shape": [32],
        "num_classes": 32,
        "vocab_size": 32,
        "num_kv_pairs": 8,
        "num_train": 4000,
        "num_val": 500,
        "num_test": 500,
    },
    "stem": {"channels": 32, "kernel_size": 4},
    "stages": [
        {
            "depth": [1],
            "width": [24, 32],
            "blocks": [
                {"type": "gla", "num_heads": [1, 2], "key_dim": [4, 8, 16], "value_dim": [8, 16], "ffn": "glu", "mlp_ratio": [1, 2], "activation": "gelu"},
            ],
        }
    ],
    "sequence_length": [32],
    "training": {
        "epochs": 16,
        "batch_size": 32,
        "optimizer": "adamw",
        "lr": 0.002,
        "weight_decay": 0.01,
        "warmup_epochs": 1,
        "seed": 0,
    },
}
"""Multi-query associative recall with 8 key-value pairs, one gated-linear-attention block: its recurrent state has
num_heads x key_dim rows (4 to 32), so the small states cannot hold every pair (stand-alone, width 32: 1 head x 4 ->
about 35%, 1 x 8 -> 76%, 2 x 4 -> 98%, 1 x 16 -> 99.6%). What was left out, and why: softmax attention reached 100% at
every size tried (head_dim 4, width 16, even 16 pairs of a 256-token vocabulary), so it only adds ties; two GLA layers
sat on a plateau near 17% for 2,500+ steps, so at this budget deeper subnets scored below shallow ones; width 16 often
never left the plateau. Even one layer sometimes stays on the plateau for the whole run with one seed and not the
other; the noise-ceiling row measures how much."""


@dataclass(frozen=True, slots=True)
class TaskSetting:
    """One task of a setting: its space file (as a dict), how many subnets, the size of the pool they are drawn
    from, and per-method options (``training:`` keys of that strategy) this task needs."""

    name: str
    space: dict[str, Any]
    subnets: int
    pool: int
    method_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


def merged(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of ``base`` with ``changes`` merged in (dicts recursively, other values replaced)."""
    result = copy.deepcopy(dict(base))
    for key, value in changes.items():
        if isinstance(value, Mapping) and isinstance(result.get(key), Mapping):
            result[key] = merged(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


SETTINGS: dict[str, tuple[TaskSetting, ...]] = {
    "full": (
        TaskSetting("digits", DIGITS_SPACE, subnets=40, pool=600),
        TaskSetting("mqar", MQAR_SPACE, subnets=40, pool=100, method_options={"sandwich": {"largest_only_epochs": 4}, "mixture": {"largest_only_epochs": 4}}),
    ),
    "quick": (
        TaskSetting("digits", merged(DIGITS_SPACE, {"training": {"epochs": 1, "warmup_epochs": 0}}), subnets=6, pool=40),
        TaskSetting(
            "mqar",
            merged(MQAR_SPACE, {"task": {"num_train": 256, "num_val": 64, "num_test": 64}, "training": {"epochs": 1, "warmup_epochs": 0}}),
            subnets=6,
            pool=40,
        ),
    ),
}
"""``full``: the benchmark; ``quick``: the same spaces at one epoch and tiny data, for CI (under a minute)."""


def digest(value: Any, length: int = 16) -> str:
    """A stable hex digest of a JSON-able value."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, allow_nan=False).encode()).hexdigest()[:length]


def arch_key(arch: Arch) -> str:
    """A stable key of ``arch`` (its JSON, hashed; longer than ``Arch.digest`` so that samples never collide)."""
    return hashlib.sha256(arch.to_json().encode()).hexdigest()[:16]


def config_for(setting: TaskSetting, method: str | None = None, options: Mapping[str, Any] | None = None) -> RunConfig:
    """The run config of ``setting``: with ``method`` as ``training.strategy`` and its options (the task's, then
    ``options``), or the strategy-free config the stand-alone recipe reads (``method`` None)."""
    data = copy.deepcopy(setting.space)
    if method is not None:
        data["training"] = {**data["training"], "strategy": method, **setting.method_options.get(method, {}), **(options or {})}
    text = yaml.safe_dump(data, sort_keys=False)
    source = f"ranking_fidelity:{setting.name}" + (f":{method}" if method else "")
    return parse_config(text, source)


def recipe(config: RunConfig) -> dict[str, Any]:
    """What a stand-alone training depends on besides the arch and its seed: the task and data, the stem and head,
    and the training settings every method shares."""
    space_data = yaml.safe_load(config.text)
    training = config.training
    return {
        "task": space_data["task"],
        "stem": space_data["stem"],
        "head": space_data.get("head"),
        "training": {
            "epochs": training.epochs,
            "batch_size": training.batch_size,
            "optimizer": training.optimizer,
            "lr": training.lr,
            "weight_decay": training.weight_decay,
            "warmup_epochs": training.warmup_epochs,
            "label_smoothing": training.label_smoothing,
            "augment": training.augment,
            "data_seed": training.seed,
        },
    }


class JsonCache:
    """A JSON file of entries by key, shared safely by processes using the same ``--out``: every write takes an
    exclusive lock on ``<file>.lock``, re-reads the file, adds its entry and replaces the file atomically, so a killed
    run loses nothing and two runs never drop each other's entries."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries = self.read()

    def read(self) -> dict[str, Any]:
        if not self.path.is_file():
            return {}
        data = jsonio.loads(self.path.read_text())
        return dict(data["entries"]) if data.get("version") == CACHE_VERSION else {}

    def get(self, key: str) -> Any:
        if key not in self.entries:
            self.entries = {**self.read(), **self.entries}
        return self.entries.get(key)

    def put(self, key: str, value: Any) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.entries = {**self.entries, **self.read(), key: value}
            jsonio.write(self.path, {"version": CACHE_VERSION, "entries": self.entries}, nonfinite="error")


def held_out(task_data: TaskData) -> Split:
    """Validation and test split together (neither is trained on): inputs [N_val + N_test, ...]."""
    return Split(torch.cat([task_data.val.inputs, task_data.test.inputs]), torch.cat([task_data.val.targets, task_data.test.targets]))


def stratified_sample(space: SearchSpace, count: int, pool_size: int, seed: int) -> list[Arch]:
    """``count`` distinct archs spread over the space's MACs: the smallest and the largest, then for each of
    ``count - 2`` evenly spaced targets in log-MACs between them, the not yet chosen member of a pool of up to
    ``pool_size`` distinct random archs whose log-MACs is nearest (the pool's random order breaks ties).

    Raises ValueError when the space has fewer than ``count`` distinct archs in reach of the pool."""
    rng = np.random.default_rng(seed)
    costs = ArchCosts.for_space(space)
    smallest, largest = space.smallest(), space.largest()
    pool: dict[Arch, None] = {}
    for _ in range(20 * pool_size):
        if len(pool) >= pool_size:
            break
        arch = space.sample(rng)
        if arch not in (smallest, largest):
            pool[arch] = None
    candidates = list(pool)
    if len(candidates) < count - 2:
        raise ValueError(f"the space gave {len(candidates) + 2} distinct archs in {20 * pool_size} draws; {count} are needed")
    log_macs = np.log([costs.cost(arch)[1] for arch in candidates])
    low, high = math.log(costs.cost(smallest)[1]), math.log(costs.cost(largest)[1])
    chosen = [smallest, largest] if count >= 2 else [largest][:count]
    taken = np.zeros(len(candidates), dtype=bool)
    for target in np.linspace(low, high, count)[1:-1]:
        distance = np.where(taken, np.inf, np.abs(log_macs - target))
        index = int(np.argmin(distance))
        taken[index] = True
        chosen.append(candidates[index])
    return sorted(chosen, key=lambda arch: (costs.cost(arch)[1], arch_key(arch)))


def train_standalone(config: RunConfig, arch: Arch, task_data: TaskData, evaluation: Split, seed: int) -> dict[str, Any]:
    """Train ``build_static(space, arch)`` from scratch with the recipe of ``config`` and ``seed``; its held-out
    accuracy (eval mode, the network's own batch-norm statistics), wall seconds and optimizer steps.

    The loop's pieces, as the supernet runs use them: ``make_optimizer``, the warm-up + cosine ``Schedule``, batches
    from ``iterate_batches`` seeded per epoch with ``epoch_seed(seed, epoch)``, ``augment`` on image tasks,
    ``prepare_batch`` and the label loss of ``task_loss``."""
    training = config.training
    started = time.perf_counter()
    torch.manual_seed(seed)
    network = build_static(config.space, arch)
    optimizer = make_optimizer(network, training)
    steps_per_epoch = max(1, len(task_data.train.targets) // training.batch_size)
    schedule = Schedule(training.lr, training.epochs, training.warmup_epochs, steps_per_epoch)
    task = SubnetTask(arch)
    steps = 0
    for epoch in range(training.epochs):
        seed_of_epoch = epoch_seed(seed, epoch)
        generator = torch.Generator().manual_seed(seed_of_epoch)
        torch.manual_seed(seed_of_epoch)
        network.train()
        batches = iterate_batches(task_data.train, training.batch_size, shuffle=True, generator=generator, drop_last=True)
        for step, (inputs, targets) in enumerate(batches):
            if training.augment and config.space.modality == "image":
                inputs = augment(inputs, generator)
            x, y = prepare_batch(inputs, targets, arch)
            optimizer.zero_grad(set_to_none=True)
            loss = task_loss(task, network(x), y, None, training.label_smoothing)
            loss.backward()
            for group in optimizer.param_groups:
                group["lr"] = schedule.at(epoch * steps_per_epoch + step)
            optimizer.step()
            steps += 1
    return {"accuracy": accuracy(network, arch, evaluation), "seconds": time.perf_counter() - started, "steps": steps}


def count_steps(config: RunConfig, steps_per_epoch: int) -> dict[str, Any]:
    """Optimizer updates and subnet passes (one forward and backward of one subnet on one batch) of a run of
    ``config``, replayed from the strategy's per-step tasks with the loop's per-epoch generators (consecutive tasks
    with equal ``lr_scale`` share one update, as ``train_step`` does). Exact for strategies whose tasks depend on
    their arguments and options only, as the interface asks."""
    strategy = build_strategy(config, steps_per_epoch)
    updates = passes = 0
    phases = []
    for epoch in range(config.training.epochs):
        rng = np.random.default_rng(epoch_seed(config.training.seed, epoch))
        phase = strategy.phase(epoch)
        phases.append(phase.name)
        for step in range(steps_per_epoch):
            tasks = strategy.tasks(phase, rng, epoch, step)
            passes += len(tasks)
            updates += 1 + sum(1 for before, after in zip(tasks, tasks[1:], strict=False) if before.lr_scale != after.lr_scale)
    return {"optimizer_steps": updates, "subnet_passes": passes, "phases": phases}


def run_method(config: RunConfig, run_dir: Path, task_data: TaskData, archs: Sequence[Arch], evaluation: Split) -> dict[str, Any]:
    """Train (or resume) the supernet of ``config`` in ``run_dir`` and score ``archs`` with inherited weights after
    BN recalibration on the run's calibration batches."""
    resume = RunDir(run_dir).config.is_file()
    started = time.perf_counter()
    result = train(config, run_dir, resume=resume, task_data=task_data)
    call_seconds = time.perf_counter() - started
    _, supernet, _ = load_run(run_dir)
    calibration = run_calibration_batches(config, task_data.train)
    scored = time.perf_counter()
    inherited = [evaluate_arch(supernet, arch, calibration, evaluation) for arch in archs]
    evaluation_seconds = time.perf_counter() - scored
    steps_per_epoch = max(1, len(task_data.train.targets) // config.training.batch_size)
    counted = count_steps(config, steps_per_epoch)
    if counted["phases"] != result.metrics.get("phases"):
        raise RuntimeError(f"replayed phases {counted['phases']} differ from the run's {result.metrics.get('phases')}: the step count would be wrong")
    return {
        "inherited": inherited,
        "largest": evaluate_arch(supernet, config.space.largest(), calibration, evaluation),
        "smallest": evaluate_arch(supernet, config.space.smallest(), calibration, evaluation),
        "train_seconds": result.metrics["train_seconds"],
        "call_seconds_last_invocation": call_seconds,
        "evaluation_seconds": evaluation_seconds,
        "optimizer_steps": counted["optimizer_steps"],
        "subnet_passes": counted["subnet_passes"],
        "phases": counted["phases"],
        "epochs": config.training.epochs,
        "strategy_options": config.training.strategy_options().model_dump(),
    }


def kendall(first: Sequence[float] | np.ndarray, second: Sequence[float] | np.ndarray) -> float | None:
    """Kendall's tau-b (ties counted), or None when one side is constant."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        value = float(stats.kendalltau(first, second).statistic)
    return value if math.isfinite(value) else None


def spearman(first: Sequence[float] | np.ndarray, second: Sequence[float] | np.ndarray) -> float | None:
    """Spearman's rho, or None when one side is constant."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        value = float(stats.spearmanr(first, second).statistic)
    return value if math.isfinite(value) else None


def kendall_tau_b_rows(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Kendall's tau-b of every row pair (``scipy.stats.kendalltau``'s default, vectorised over rows; NaN where a
    row is constant). first, second: [R, N] -> [R]."""
    rows, size = first.shape
    upper = np.triu_indices(size, k=1)
    concordance = np.sign(first[:, :, None] - first[:, None, :])[:, upper[0], upper[1]]
    agreement = np.sign(second[:, :, None] - second[:, None, :])[:, upper[0], upper[1]]
    untied_first = np.count_nonzero(concordance, axis=1)
    untied_second = np.count_nonzero(agreement, axis=1)
    denominator = np.sqrt(untied_first.astype(np.float64) * untied_second)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (concordance * agreement).sum(axis=1) / denominator, np.nan)


def bootstrap_interval(first: Sequence[float] | np.ndarray, second: Sequence[float] | np.ndarray, *, seed: int = 0) -> tuple[float, float] | None:
    """95% percentile bootstrap interval of Kendall's tau-b over pairs resampled with replacement
    (``BOOTSTRAP_RESAMPLES`` resamples; resamples where it is undefined are dropped), or None when it never is."""
    first, second = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    index = np.random.default_rng(seed).integers(0, len(first), size=(BOOTSTRAP_RESAMPLES, len(first)))
    values = kendall_tau_b_rows(first[index], second[index])
    values = values[np.isfinite(values)]
    if not len(values):
        return None
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def top_overlap(first: Sequence[float], second: Sequence[float], k: int = TOP_K) -> int:
    """How many of the ``k`` highest of ``first`` are among the ``k`` highest of ``second`` (ties broken by
    position)."""

    def top(values: Sequence[float]) -> set[int]:
        return set(np.argsort(-np.asarray(values, dtype=np.float64), kind="stable")[:k].tolist())

    return len(top(first) & top(second))


def ranking_statistics(predicted: Sequence[float], reference: Sequence[float], *, seed: int = 0) -> dict[str, Any]:
    """Kendall tau with its 95% bootstrap interval, Spearman rho and top-k overlap of ``predicted`` against
    ``reference`` (one value per subnet, in the same order)."""
    if len(predicted) != len(reference) or len(predicted) < 2:
        raise ValueError(f"need two equally long sequences of at least 2 values, got {len(predicted)} and {len(reference)}")
    return {
        "kendall_tau": kendall(predicted, reference),
        "kendall_tau_ci95": bootstrap_interval(predicted, reference, seed=seed),
        "spearman_rho": spearman(predicted, reference),
        "top_k": min(TOP_K, len(predicted)),
        "top_k_overlap": top_overlap(predicted, reference, min(TOP_K, len(predicted))),
    }


def method_row(row: Mapping[str, Any], reference: Sequence[float]) -> dict[str, Any]:
    """The statistics of one method's cached row against the reference accuracies."""
    inherited = row["inherited"]
    return {
        **ranking_statistics(inherited, reference),
        "mean_absolute_gap_points": 100 * float(np.mean(np.abs(np.asarray(inherited) - np.asarray(reference)))),
        "largest_inherited": row["largest"],
        "smallest_inherited": row["smallest"],
        "train_seconds": row["train_seconds"],
        "optimizer_steps": row["optimizer_steps"],
        "subnet_passes": row["subnet_passes"],
        "epochs": row["epochs"],
        "phases": row["phases"],
        "strategy_options": row["strategy_options"],
        "inherited": inherited,
    }


@dataclass
class Caches:
    samples: JsonCache
    standalone: JsonCache
    methods: JsonCache

    @classmethod
    def under(cls, out: Path) -> Caches:
        return cls(JsonCache(out / "samples.json"), JsonCache(out / "standalone.json"), JsonCache(out / "methods.json"))


def say(message: str) -> None:
    print(message, flush=True)


def task_sample(setting: TaskSetting, config: RunConfig, caches: Caches) -> list[Arch]:
    space_data = {key: value for key, value in yaml.safe_load(config.text).items() if key != "training"}
    key = f"{setting.name}/{digest(space_data)}/n{setting.subnets}/pool{setting.pool}/seed0"
    cached = caches.samples.get(key)
    if cached is not None:
        return [Arch.from_dict(item, config.space) for item in cached]
    started = time.perf_counter()
    archs = stratified_sample(config.space, setting.subnets, setting.pool, seed=0)
    caches.samples.put(key, [arch.to_dict() for arch in archs])
    say(f"[{setting.name}] sampled {len(archs)} subnets stratified by MACs from a pool of {setting.pool} ({time.perf_counter() - started:.1f} s)")
    return archs


def ground_truth(
    setting: TaskSetting, config: RunConfig, archs: Sequence[Arch], task_data: TaskData, evaluation: Split, caches: Caches
) -> dict[int, list[dict]]:
    """Every arch trained stand-alone with every seed of ``STANDALONE_SEEDS`` (cached entries reused)."""
    recipe_key = digest(recipe(config))
    results: dict[int, list[dict]] = {}
    for seed in STANDALONE_SEEDS:
        results[seed] = []
        for index, arch in enumerate(archs):
            key = f"{setting.name}/{arch_key(arch)}/{recipe_key}/seed{seed}"
            entry = caches.standalone.get(key)
            if entry is None:
                entry = {"arch": arch.to_dict(), "seed": seed, **train_standalone(config, arch, task_data, evaluation, seed)}
                caches.standalone.put(key, entry)
                say(
                    f"[{setting.name}] stand-alone seed {seed} {index + 1}/{len(archs)} {arch.short_name()}: "
                    f"{100 * entry['accuracy']:.2f}% ({entry['seconds']:.1f} s)"
                )
            results[seed].append(entry)
    return results


def strategy_source_digest(method: str) -> str:
    """A digest of the source of the module that defines strategy ``method``: a changed strategy is trained again
    instead of being read from the cache."""
    strategy = STRATEGIES.get(method)
    return hashlib.sha256(inspect.getsource(inspect.getmodule(strategy) or strategy).encode()).hexdigest()[:16]


def method_results(
    setting: TaskSetting, method: str, options: Mapping[str, Any], archs: Sequence[Arch], task_data: TaskData, evaluation: Split, out: Path, caches: Caches
) -> dict[str, Any] | None:
    """The cached row of ``method`` on ``setting``, or a new one (its supernet trained or resumed, then scored);
    None when another process holds its run folder."""
    config = config_for(setting, method, options)
    identity = digest({"config": config.text, "archs": [arch_key(arch) for arch in archs], "strategy_source": strategy_source_digest(method)})
    key = f"{setting.name}/{method}/{identity}"
    cached = caches.methods.get(key)
    if cached is not None:
        return cached
    say(f"[{setting.name}] training the {method} supernet ({config.training.epochs} epochs)")
    try:
        trained = run_method(config, out / "runs" / setting.name / f"{method}-{identity[:8]}", task_data, archs, evaluation)
    except RunBusyError as error:
        say(f"[{setting.name}] {method}: left out, {error}")
        return None
    row = {"method": method, "config": config.text, **trained}
    caches.methods.put(key, row)
    say(f"[{setting.name}] {method}: trained in {row['train_seconds']:.0f} s, {row['optimizer_steps']} optimizer steps")
    return row


def task_results(
    setting: TaskSetting, methods: Sequence[str], options: Mapping[str, Mapping[str, Any]], out: Path, caches: Caches, ground_truth_only: bool
) -> dict:
    config = config_for(setting)
    task_data = load_task_data(config.task, config.space, seed=config.training.seed)
    evaluation = held_out(task_data)
    archs = task_sample(setting, config, caches)
    costs = ArchCosts.for_space(config.space)
    params = [float(costs.cost(arch)[0]) for arch in archs]
    macs = [float(costs.cost(arch)[1]) for arch in archs]
    truth = ground_truth(setting, config, archs, task_data, evaluation, caches)
    per_seed = np.asarray([[entry["accuracy"] for entry in truth[seed]] for seed in STANDALONE_SEEDS])
    reference = per_seed.mean(axis=0)
    spread = 100 * float(reference.max() - reference.min())
    if spread < SPREAD_GOAL_POINTS:
        say(f"[{setting.name}] WARNING: stand-alone spread {spread:.1f} points is below {SPREAD_GOAL_POINTS}: tau mostly measures noise")
    rows: dict[str, Any] = {
        "macs": {**ranking_statistics(macs, reference)},
        "params": {**ranking_statistics(params, reference)},
        "noise_ceiling": {
            **ranking_statistics(per_seed[1], per_seed[0]),
            "mean_absolute_gap_points": 100 * float(np.mean(np.abs(per_seed[1] - per_seed[0]))),
        },
    }
    method_rows = {}
    if not ground_truth_only:
        for method in methods:
            row = method_results(setting, method, options.get(method, {}), archs, task_data, evaluation, out, caches)
            if row is not None:
                method_rows[method] = method_row(row, list(reference))
    standalone_seconds = [entry["seconds"] for seed in STANDALONE_SEEDS for entry in truth[seed]]
    return {
        "task": setting.name,
        "space": yaml.safe_load(config.text),
        "subnets": len(archs),
        "evaluation_split": f"val + test ({len(evaluation.targets)} examples)",
        "standalone": {
            "seeds": list(STANDALONE_SEEDS),
            "spread_points": spread,
            "spread_points_per_seed": [100 * float(values.max() - values.min()) for values in per_seed],
            "mean_accuracy": float(reference.mean()),
            "min_accuracy": float(reference.min()),
            "max_accuracy": float(reference.max()),
            "seconds_total": float(sum(standalone_seconds)),
            "seconds_per_training": float(np.mean(standalone_seconds)),
            "steps_per_training": truth[STANDALONE_SEEDS[0]][0]["steps"],
        },
        "archs": [
            {"arch": arch.to_dict(), "name": arch.short_name(), "params": int(p), "macs": int(m), "standalone": [float(v) for v in per_seed[:, i]]}
            for i, (arch, p, m) in enumerate(zip(archs, params, macs, strict=True))
        ],
        "baselines": rows,
        "methods": method_rows,
    }


def machine() -> dict[str, Any]:
    """This machine as the project describes one (``nas.latency.fingerprint``), plus memory and software."""
    model, flags = cpu_description()
    memory = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {
        "cpu_model": model,
        "cpu_flags": list(flags),
        "logical_cores": os.cpu_count() or 1,
        "machine": platform.machine(),
        "memory_gib": memory,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def tau_text(row: Mapping[str, Any]) -> str:
    tau, interval = row.get("kendall_tau"), row.get("kendall_tau_ci95")
    if tau is None:
        return "-"
    return f"{tau:.3f} [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else f"{tau:.3f}"


def number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(results: Mapping[str, Any]) -> str:
    """The results as markdown: one table per task, then the reference points."""
    lines = [
        f"# Ranking fidelity ({results['setting']}), {results['date']}",
        "",
        f"Machine: {results['machine']['cpu_model']}, {results['machine']['logical_cores']} logical cores, "
        f"torch {results['machine']['torch']} with {results['machine']['torch_threads']} thread(s).",
        "",
    ]
    for task in results["tasks"]:
        standalone = task["standalone"]
        training = task["space"]["training"]
        lines += [
            f"## {task['task']}: {task['subnets']} subnets, {training['epochs']} epochs, batch {training['batch_size']}, {task['evaluation_split']}",
            "",
            f"Stand-alone accuracy (mean of seeds {standalone['seeds']}): {percent(standalone['min_accuracy'])} .. "
            f"{percent(standalone['max_accuracy'])}, spread {standalone['spread_points']:.1f} points "
            f"(per seed {', '.join(f'{value:.1f}' for value in standalone['spread_points_per_seed'])}); "
            f"{standalone['seconds_per_training']:.1f} s and {standalone['steps_per_training']} steps per training, "
            f"{standalone['seconds_total']:.0f} s in all.",
            "",
            "| ranking by | Kendall tau [95% CI] | Spearman rho | top-5 overlap | mean abs gap (points) | largest / smallest inherited | "
            "train (s) | optimizer steps | subnet passes |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, row in task["methods"].items():
            lines.append(
                f"| {name} (inherited) | {tau_text(row)} | {number(row['spearman_rho'])} | {row['top_k_overlap']}/{row['top_k']} | "
                f"{row['mean_absolute_gap_points']:.1f} | {percent(row['largest_inherited'])} / {percent(row['smallest_inherited'])} | "
                f"{row['train_seconds']:.0f} | {row['optimizer_steps']} | {row['subnet_passes']} |"
            )
        baselines = task["baselines"]
        for label, name in (("MACs only", "macs"), ("parameters only", "params")):
            row = baselines[name]
            lines.append(f"| {label} | {tau_text(row)} | {number(row['spearman_rho'])} | {row['top_k_overlap']}/{row['top_k']} | | | | | |")
        row = baselines["noise_ceiling"]
        lines.append(
            f"| noise ceiling (stand-alone seed 1 vs 0) | {tau_text(row)} | {number(row['spearman_rho'])} | {row['top_k_overlap']}/{row['top_k']} | "
            f"{row['mean_absolute_gap_points']:.1f} | | {standalone['seconds_total'] / len(standalone['seeds']):.0f} | | |"
        )
        lines.append("")
    lines += ["Reference points (Kendall tau):", ""]
    lines += [f"- {label}: {value}" for label, value in REFERENCE_POINTS]
    return "\n".join(lines) + "\n"


def parse_options(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``METHOD.OPTION=VALUE`` (the value read as YAML) -> ``{method: {option: value}}``."""
    options: dict[str, dict[str, Any]] = {}
    for item in items:
        name, separator, value = item.partition("=")
        method, dot, option = name.partition(".")
        if not separator or not dot or not method or not option:
            raise SystemExit(f"--set must look like METHOD.OPTION=VALUE, got {item!r}")
        options.setdefault(method, {})[option] = yaml.safe_load(value)
    return options


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", help="comma-separated training strategies (default: every registered one)")
    parser.add_argument("--tasks", help="comma-separated tasks (default: all of the setting)")
    parser.add_argument("--quick", action="store_true", help="the CI-sized setting (few subnets, one epoch, tiny data)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results and caches (default: %(default)s; with --quick its quick/ folder)")
    parser.add_argument("--set", action="append", default=[], metavar="METHOD.OPTION=VALUE", help="a strategy option for every task (repeatable)")
    parser.add_argument("--ground-truth-only", action="store_true", help="only the stand-alone trainings and the baseline rows")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = parser.parse_args(argv)
    setting_name = "quick" if args.quick else "full"
    settings = SETTINGS[setting_name]
    if args.tasks:
        wanted = args.tasks.split(",")
        unknown = sorted(set(wanted) - {setting.name for setting in settings})
        if unknown:
            raise SystemExit(f"--tasks: unknown {unknown}; tasks: {[setting.name for setting in settings]}")
        settings = tuple(setting for setting in settings if setting.name in wanted)
    methods = args.methods.split(",") if args.methods else list(STRATEGIES.names())
    for method in methods:
        STRATEGIES.get(method)
    options = parse_options(args.set)
    out = DEFAULT_OUT / "quick" if args.quick and args.out == DEFAULT_OUT else args.out
    out.mkdir(parents=True, exist_ok=True)
    caches = Caches.under(out)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    try:
        tasks = [task_results(setting, methods, options, out, caches, args.ground_truth_only) for setting in settings]
    finally:
        torch.set_num_threads(threads)
    results = {
        "benchmark": "ranking_fidelity",
        "setting": setting_name,
        "date": datetime.date.today().isoformat(),
        "machine": {**machine(), "torch_threads": args.threads},
        "command": " ".join(["python", "benchmarks/ranking_fidelity.py", *(argv if argv is not None else sys.argv[1:])]),
        "seconds_this_invocation": time.perf_counter() - started,
        "standalone_seeds": list(STANDALONE_SEEDS),
        "bootstrap_resamples": BOOTSTRAP_RESAMPLES,
        "reference_points": [{"label": label, "kendall_tau": value} for label, value in REFERENCE_POINTS],
        "tasks": tasks,
    }
    jsonio.write(out / "results.json", results, nonfinite="error")
    table = markdown(results)
    (out / "results.md").write_text(table)
    say(table)
    return results


if __name__ == "__main__":
    main()
