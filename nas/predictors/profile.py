"""Hardware profiles: a designed sample of subnets measured on one device, the predictors fitted on it, and a quality
report against held-out measurements beside the machine's own noise floor.

A profile is a folder::

    profile.json          what was measured where: space (name and digest), target, device fingerprint and its key,
                          the sample (archs, their role: fit or test), the settings, the fitted predictors' names
    measurements.jsonl    one line per measured model, appended and fsynced as it is measured (pass 1: every
                          sample arch; pass 2: the held-out archs again, the noise floor)
    pieces.jsonl          every distinct piece of the sample's archs measured alone (the look-up table)
    predictors/<name>/    each fitted predictor (``LatencyPredictor.save``)
    quality.json / quality.md   the quality table
    checks/<time>.json    each ``nas profile --check``: a fresh sample measured twice against every predictor

Protocol (``build_profile``):

1. The sample (``design_sample``): the space's smallest and largest subnet, then the rest of the budget spread
   evenly over strata (input size x the set of block types an arch uses), inside each stratum at evenly spaced
   quantiles of log-MACs of a pool of random distinct archs. Every fifth arch of the sample in (stratum, MACs) order
   is held out (``role: test``): the held-out set is stratified the same way as the fitted one.
2. Each arch is built with fresh random weights (``build_static``; latency does not depend on the weights), exported
   to ONNX as a search exports it (fp32 checked against PyTorch; INT8 targets: static QDQ with random calibration
   inputs, which changes scales, not the graph) and measured with ``nas.latency.measure_latency``, eight archs
   interleaved per call (``measure_seconds`` each). Each measurement keeps its median and its 10th percentile; the
   predictors are fitted on one of them, the profile's ``statistic`` (default ``p10``: on a shared machine the
   10th percentile tracks the uncontended latency and repeats far better than the median, which moves with the load
   of the moment; ``median`` is the search's measured objective). It can be changed on a rerun, which refits only.
3. Pass 2 measures the held-out archs again, later and in other batches: the same statistics of pass 2 against
   pass 1 are the noise floor, the best any predictor can show against a single fresh measurement.
4. Every distinct piece of the sample's archs (``PieceCosts.pieces``: stem, projections, blocks in context at their
   input size, head) is exported alone and measured the same way: the look-up table of ``lut`` and ``gbdt_lut``.
5. Every predictor of ``PROFILE_PREDICTORS`` is fitted on the fit archs (pass 1) and scored on the held-out archs
   (pass 1): share within +-5 % and +-10 %, MAPE, Kendall tau; the one with the most held-out archs within +-10 %
   (then the highest tau) is the profile's ``best``.

A kill at any point loses at most the batch being measured: a rerun reads ``measurements.jsonl`` (a last line cut
short is set aside, ``nas.durable.set_aside_cut_record``) and measures only what is missing. The folder is locked
(``nas.run_lock.RunLock``) while a profile is built, so two processes never measure into one profile.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nas import jsonio
from nas.durable import set_aside_cut_record
from nas.export.onnx import ExportError
from nas.predictors.arch_costs import ArchCosts, Piece, PieceCosts
from nas.predictors.base import ForeignFingerprintError, LatencyPredictor, PredictorError, create_predictor
from nas.predictors.lut import PieceTable, piece_id, piece_kind
from nas.supernets.space import Arch, SearchSpace

logger = logging.getLogger(__name__)

PROFILE_FILE = "profile.json"
MEASUREMENTS_FILE = "measurements.jsonl"
QUALITY_JSON = "quality.json"
QUALITY_MARKDOWN = "quality.md"
PREDICTORS_FOLDER = "predictors"
CHECKS_FOLDER = "checks"
FORMAT = "nasforge.hardware_profile"
VERSION = 1

PROFILE_PREDICTORS = ("linear_macs", "lut", "gbdt", "gbdt_lut")
"""The predictors every profile fits and reports, in the order of its table."""

TABLE_PREDICTORS = frozenset({"lut", "gbdt_lut"})
"""Those that take the profile's piece table (``table=``)."""

PIECES_FILE = "pieces.jsonl"

WEAK_HELD_OUT = 10
"""Below this many held-out archs the quality table says its figures are weak."""

HOLDOUT_EVERY = 5
"""Every fifth sample arch (in stratum and MACs order) is held out for the quality table."""

BATCH = 8
"""Archs measured interleaved in one ``measure_latency`` call."""

MAX_POOL = 50_000
"""The most random draws the designed sample chooses from."""

PROFILE_EXPORT_TOLERANCE = 1e-3
"""Max |ORT - PyTorch| allowed when a profile exports a subnet: random weights and inputs give larger logits than a
trained network (the search's exports keep the 1e-4 check); this still catches a wrong graph."""

DEFAULT_ROOT = "profiles"
"""``nas profile`` writes to ``profiles/<space>/<target>-<device key>`` (relative to the working directory) by default."""

STATISTICS = ("p10", "median")
DEFAULT_STATISTIC = "p10"

DEFAULT_BUDGET = 200
DEFAULT_MEASURE_SECONDS = 0.5


class ProfileError(PredictorError):
    """A profile that cannot be built, read or used: another space, another device, a damaged file, bad settings."""


@dataclass(frozen=True, slots=True)
class Quality:
    """How well ``predicted`` matches ``measured`` on the same archs."""

    count: int
    within_5: float
    within_10: float
    mape: float
    kendall_tau: float

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "within_5": self.within_5, "within_10": self.within_10, "mape": self.mape, "kendall_tau": self.kendall_tau}


def quality(predicted: Sequence[float] | np.ndarray, measured: Sequence[float] | np.ndarray) -> Quality:
    """Share of archs whose prediction is within +-5 % and +-10 % of the measurement (relative to the measurement),
    mean absolute percentage error (as a fraction) and Kendall's tau-b (``scipy.stats.kendalltau``; 0 with fewer than
    two archs or a constant side)."""
    from scipy.stats import kendalltau

    predicted_array = np.asarray(predicted, dtype=np.float64)
    measured_array = np.asarray(measured, dtype=np.float64)
    if predicted_array.shape != measured_array.shape or predicted_array.ndim != 1:
        raise ProfileError(f"quality: predicted {predicted_array.shape} and measured {measured_array.shape} must be equal flat arrays")
    if len(measured_array) == 0:
        return Quality(0, math.nan, math.nan, math.nan, math.nan)
    error = np.abs(predicted_array - measured_array) / measured_array
    tau = math.nan
    if len(measured_array) >= 2:
        tau = float(kendalltau(predicted_array, measured_array).statistic)
    return Quality(
        count=len(measured_array),
        within_5=float(np.mean(error <= 0.05)),
        within_10=float(np.mean(error <= 0.10)),
        mape=float(np.mean(error)),
        kendall_tau=tau if math.isfinite(tau) else 0.0,
    )


def space_digest(space: SearchSpace) -> str:
    """A short digest of everything the space is (its frozen description): a profile is for this space only."""
    return hashlib.sha256(repr(space).encode()).hexdigest()[:16]


def stratum(space: SearchSpace, arch: Arch) -> tuple[int, tuple[str, ...]]:
    """(input size, sorted block types used): the strata of the designed sample."""
    from nas.supernets.blocks import type_of

    size = arch.resolution if space.modality == "image" else arch.sequence_length
    types = sorted({type_of(config).name for stage in arch.stages for config in stage.blocks})
    return int(size or 0), tuple(types)


def design_sample(space: SearchSpace, count: int, *, seed: int, pool_size: int | None = None) -> list[Arch]:
    """``count`` distinct archs: the smallest and the largest, then per stratum (``stratum``) an equal share of the
    rest at evenly spaced log-MACs quantiles of that stratum's members in a pool of random distinct archs
    (``pool_size``, default ``max(2000, 20 * count)`` draws, at most ``MAX_POOL``). Deterministic for a seed. Fewer archs than ``count`` only
    when the space has fewer distinct ones within reach of the pool."""
    if count < 2:
        raise ProfileError(f"a profile needs a budget of at least 2 subnets, got {count}")
    rng = np.random.default_rng(seed)
    costs = ArchCosts.for_space(space)
    anchors = list(dict.fromkeys([space.smallest(), space.largest()]))
    seen = set(anchors)
    pool: list[Arch] = []
    draws = pool_size if pool_size is not None else min(MAX_POOL, max(2000, 20 * count))
    for _ in range(draws):
        arch = space.sample(rng)
        if arch not in seen:
            seen.add(arch)
            pool.append(arch)
    strata: dict[tuple[int, tuple[str, ...]], list[tuple[float, int, Arch]]] = {}
    for order, arch in enumerate(pool):
        macs = costs.cost(arch)[1]
        strata.setdefault(stratum(space, arch), []).append((math.log(max(macs, 1)), order, arch))
    for members in strata.values():
        members.sort(key=lambda item: (item[0], item[1]))
    wanted = max(0, count - len(anchors))
    quotas = {key: 0 for key in strata}
    keys = sorted(strata)
    while wanted > 0 and keys:
        open_keys = [key for key in keys if quotas[key] < len(strata[key])]
        if not open_keys:
            break
        for key in open_keys:
            if wanted == 0:
                break
            quotas[key] += 1
            wanted -= 1
    chosen = list(anchors)
    for key in sorted(strata):
        members, quota = strata[key], quotas[key]
        if quota == 0:
            continue
        picks = sorted({min(len(members) - 1, int((index + 0.5) * len(members) / quota)) for index in range(quota)})
        spare = [index for index in range(len(members)) if index not in set(picks)]
        while len(picks) < quota and spare:
            picks.append(spare.pop(len(spare) // 2))
        chosen.extend(members[index][2] for index in sorted(picks))
    return chosen[: max(count, len(anchors))]


def split_roles(space: SearchSpace, archs: Sequence[Arch]) -> list[str]:
    """``"test"`` for every ``HOLDOUT_EVERY``-th arch in (stratum, MACs) order (starting with the third), ``"fit"`` for
    the rest; the smallest and the largest arch are always fitted (a predictor should not extrapolate to them)."""
    costs = ArchCosts.for_space(space)
    order = sorted(range(len(archs)), key=lambda index: (stratum(space, archs[index]), costs.cost(archs[index])[1], index))
    roles = ["fit"] * len(archs)
    anchors = {space.smallest(), space.largest()}
    for rank, index in enumerate(order):
        if rank % HOLDOUT_EVERY == 2 and archs[index] not in anchors:
            roles[index] = "test"
    return roles


def example_inputs(space: SearchSpace, arch: Arch, batch: int, seed: int) -> Any:
    """Random model inputs for ``arch``: images ``[B, C, R, R]`` standard normal, or token ids ``[B, L]`` uniform."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    if space.modality == "image":
        size = int(arch.resolution or 0)
        return torch.randn(batch, space.in_channels, size, size, generator=generator)
    length = int(arch.sequence_length or 0)
    return torch.randint(0, space.in_channels, (batch, length), generator=generator)


def arch_model(space: SearchSpace, arch: Arch, kind: str, *, seed: int = 0) -> bytes:
    """The ONNX model of ``arch`` (fresh random weights, fixed by ``seed``) as a search would measure it: fp32, or
    static QDQ INT8 calibrated on four random inputs (``kind="int8"``; the scales change, the graph and its
    kernels do not)."""
    import torch

    from nas.export import onnx
    from nas.supernets.supernet import build_static

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_static(space, arch).eval()
    example = example_inputs(space, arch, 4, seed)
    with tempfile.TemporaryDirectory(prefix="nasforge-profile-") as folder:
        fp32_path = Path(folder) / "model.onnx"
        onnx.export_onnx(model, example[:2], fp32_path, arch=arch, space_name=space.name, check_inputs=example, tolerance=PROFILE_EXPORT_TOLERANCE)
        if kind == "fp32":
            return fp32_path.read_bytes()
        int8_path = Path(folder) / "model.int8.onnx"
        calibration = example_inputs(space, arch, 4, seed + 1)
        onnx.quantize_int8(fp32_path, int8_path, calibration=calibration, validation=calibration[:2], min_agreement=0.0)
        return int8_path.read_bytes()


def piece_model(space: SearchSpace, piece: Piece, kind: str, *, seed: int = 0) -> bytes:
    """The ONNX model of one piece alone (fresh random weights; batch axis dynamic; input ``input``): fp32, or static
    QDQ INT8 calibrated on four random inputs, as ``arch_model`` does for whole archs."""
    import warnings

    import torch

    from nas.export import onnx

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = piece.build().eval()
        example = piece.example()
        shape = (4, *example.shape[1:])
        inputs = torch.randint(0, space.in_channels, shape) if example.dtype == torch.long else torch.randn(shape)
    with tempfile.TemporaryDirectory(prefix="nasforge-piece-") as folder:
        fp32_path = Path(folder) / "piece.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (inputs[:1],),
                str(fp32_path),
                dynamo=False,
                opset_version=17,
                do_constant_folding=True,
                input_names=[onnx.INPUT_NAME],
                output_names=[onnx.OUTPUT_NAME],
                dynamic_axes={onnx.INPUT_NAME: {0: "batch"}, onnx.OUTPUT_NAME: {0: "batch"}},
            )
        if kind == "fp32":
            return fp32_path.read_bytes()
        int8_path = Path(folder) / "piece.int8.onnx"
        onnx.quantize_int8(fp32_path, int8_path, calibration=inputs, validation=inputs[:2], min_agreement=0.0)
        return int8_path.read_bytes()


@dataclass(frozen=True, slots=True)
class ProfileSettings:
    """How a profile is built; stored in ``profile.json`` and checked on a rerun."""

    target: str
    budget: int = DEFAULT_BUDGET
    seed: int = 0
    threads: int = 1
    batch_size: int = 1
    measure_seconds: float = DEFAULT_MEASURE_SECONDS

    def __post_init__(self) -> None:
        for name, low in (("budget", 2), ("threads", 1), ("batch_size", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ProfileError(f"profile {name} must be an integer >= {low}, got {value!r}")
        if self.threads > (os.cpu_count() or 1):
            raise ProfileError(f"profile threads must be at most this machine's {os.cpu_count() or 1} logical cores, got {self.threads}")
        if not (isinstance(self.measure_seconds, int | float) and 0 < self.measure_seconds <= 600):
            raise ProfileError(f"profile measure_seconds must be in (0, 600], got {self.measure_seconds!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "budget": self.budget,
            "seed": self.seed,
            "threads": self.threads,
            "batch_size": self.batch_size,
            "measure_seconds": self.measure_seconds,
        }


class Measurements:
    """``measurements.jsonl``: records ``{"arch", "pass", "measurement"}`` (plus what the caller adds), appended and
    fsynced one per line; a last line cut short by a kill is set aside when the file is opened."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: dict[tuple[str, int], dict[str, Any]] = {}
        set_aside_cut_record(path)
        if path.exists():
            for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
                try:
                    record = json.loads(line)
                    self.records[(record["arch"], int(record["pass"]))] = record
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    raise ProfileError(
                        f"{path} line {number} is not a measurement record (damaged): delete that line and rerun (only it is measured "
                        "again); the other lines are kept"
                    ) from None

    def get(self, arch_json: str, measurement_pass: int) -> dict[str, Any] | None:
        return self.records.get((arch_json, measurement_pass))

    def value(self, arch_json: str, measurement_pass: int, statistic: str) -> float | None:
        record = self.get(arch_json, measurement_pass)
        return None if record is None or record["measurement"] is None else float(record["measurement"][f"{statistic}_ms"])

    def put(self, record: dict[str, Any]) -> None:
        self.records[(record["arch"], int(record["pass"]))] = record
        with open(self.path, "a") as file:
            file.write(jsonio.dumps(record, nonfinite="error") + "\n")
            file.flush()
            os.fsync(file.fileno())


@dataclass(frozen=True, slots=True)
class ProfileResult:
    folder: Path
    measured_now: int
    measured_total: int
    planned_total: int
    complete: bool
    quality: dict[str, Any]


class PieceMeasurements(Measurements):
    """``pieces.jsonl``: records ``{"arch": <piece id>, "pass": 1, "macs", "kind", "measurement"}`` of pieces measured
    alone (the look-up table), kept like ``measurements.jsonl``."""


def piece_plan(space: SearchSpace, archs: Sequence[Arch]) -> dict[str, Piece]:
    """Every distinct piece of ``archs`` by piece id, in first-seen order."""
    costs = PieceCosts.for_space(space)
    plan: dict[str, Piece] = {}
    for arch in archs:
        for piece in costs.pieces(arch):
            plan.setdefault(piece_id(piece), piece)
    return plan


def piece_table(space: SearchSpace, store: Measurements, statistic: str) -> PieceTable | None:
    """The look-up table of the measured pieces (``None`` before any is measured)."""
    records = [record for record in store.records.values() if record["measurement"] is not None]
    entries = {record["arch"]: {"ms": record["measurement"][f"{statistic}_ms"], "macs": record["macs"], "kind": record["kind"]} for record in records}
    return PieceTable(space, entries) if entries else None


def profile_fingerprint(settings: ProfileSettings) -> dict[str, Any]:
    """The device fingerprint of the profile's target (as the search computes it: no input shape)."""
    from nas.latency.fingerprint import device_fingerprint
    from nas.latency.targets import resolve_target

    return device_fingerprint(resolve_target(settings.target, threads=settings.threads, batch_size=settings.batch_size))


def _header(space: SearchSpace, settings: ProfileSettings, fingerprint: dict[str, Any], archs: list[Arch], roles: list[str]) -> dict[str, Any]:
    from nas.latency.fingerprint import fingerprint_key

    return {
        "format": FORMAT,
        "version": VERSION,
        "space": space.name,
        "space_digest": space_digest(space),
        "settings": settings.to_dict(),
        "fingerprint": fingerprint,
        "fingerprint_key": fingerprint_key(fingerprint),
        "sample": [{"arch": arch.to_json(), "role": role} for arch, role in zip(archs, roles, strict=True)],
        "predictors": [],
        "best": None,
    }


HEADER_TYPES: dict[str, type] = {
    "space": str,
    "space_digest": str,
    "settings": dict,
    "fingerprint": dict,
    "fingerprint_key": str,
    "sample": list,
    "predictors": list,
}


def read_header(folder: Path) -> dict[str, Any]:
    path = Path(folder) / PROFILE_FILE
    try:
        header = jsonio.loads(path.read_text())
    except OSError as error:
        raise ProfileError(f"no hardware profile at {folder}: {path} cannot be read ({error.strerror or error})") from None
    except ValueError as error:
        raise ProfileError(f"{path} is not strict JSON: {error}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT or header.get("version") != VERSION:
        raise ProfileError(f"{path} is not a nasforge hardware profile (format {FORMAT!r} version {VERSION})")
    problems = [f"{key} must be {kind.__name__}" for key, kind in HEADER_TYPES.items() if not isinstance(header.get(key), kind)]
    if not problems:
        problems += [f"settings.{key} is missing" for key in ProfileSettings.__dataclass_fields__ if key not in header["settings"]]
        problems += [
            f"sample[{index}] must be {{'arch': <JSON text>, 'role': 'fit' | 'test'}}"
            for index, entry in enumerate(header["sample"])
            if not (isinstance(entry, dict) and isinstance(entry.get("arch"), str) and entry.get("role") in ("fit", "test"))
        ][:3]
    if problems:
        raise ProfileError(f"{path} is damaged: {'; '.join(problems)}. Build the profile again into another --out")
    return header


def profile_targets(folders: Sequence[str | Path]) -> dict[str, str]:
    """``{target: folder}`` of profile folders, each read (and checked) from its ``profile.json``: what
    ``search.profiles`` holds."""
    return {read_header(Path(folder))["settings"]["target"]: str(folder) for folder in folders}


def check_header(header: dict[str, Any], space: SearchSpace, fingerprint: dict[str, Any] | None, where: Path) -> None:
    """Refuse a profile of another space, or (``fingerprint`` given) of another device or setting."""
    from nas.latency.fingerprint import describe_differences, fingerprint_differences

    if header["space"] != space.name:
        raise ProfileError(f"{where} is a profile of space {header['space']!r}, not of space {space.name!r}")
    if header["space_digest"] != space_digest(space):
        raise ProfileError(
            f"{where} is a profile of space {space.name!r} as it was (digest {header['space_digest']}); the space has changed since "
            f"(digest {space_digest(space)}), so its subnets are not the ones measured: build a new profile into another folder"
        )
    if fingerprint is not None:
        differences = fingerprint_differences(header["fingerprint"], fingerprint)
        if differences:
            raise ForeignFingerprintError(
                f"{where} was measured on another device or setting; it differs in {list(differences)} "
                f"(profile vs this machine: {describe_differences(differences)}). It is never used for this one: measure a "
                "profile here with `nas profile`, or adapt it on purpose with the `adapted` predictor (up to 20 measurements)",
                differences,
            )


@dataclass(frozen=True, slots=True)
class _Job:
    """One model to measure: the record to store with its measurement, and how to build the model of a kind."""

    record: dict[str, Any]
    build: Callable[[str], bytes]


def _arch_jobs(space: SearchSpace, settings: ProfileSettings, pending: Sequence[tuple[Arch, int, str]]) -> list[_Job]:
    costs = ArchCosts.for_space(space)
    jobs = []
    for arch, measurement_pass, role in pending:
        params, macs = costs.cost(arch)
        record = {"arch": arch.to_json(), "pass": measurement_pass, "role": role, "macs": macs, "params": params}
        jobs.append(_Job(record, functools.partial(arch_model, space, arch, seed=settings.seed)))
    return jobs


def _piece_jobs(space: SearchSpace, settings: ProfileSettings, pending: Sequence[tuple[str, Piece]]) -> list[_Job]:
    costs = PieceCosts.for_space(space)
    jobs = []
    for identity, piece in pending:
        record = {"arch": identity, "pass": 1, "macs": int(costs.piece_cost(piece)[1]), "kind": piece_kind(piece)}
        jobs.append(_Job(record, functools.partial(piece_model, space, piece, seed=settings.seed)))
    return jobs


def _measure(
    settings: ProfileSettings,
    store: Measurements,
    jobs: list[_Job],
    *,
    description: str,
    deadline: float | None,
    progress: Callable[[int, str, int], Any] | None,
    total: int,
    done: int,
) -> int:
    """Build and measure ``jobs`` ``BATCH`` at a time (interleaved in one ``measure_latency`` call), storing each record
    with its measurement and export seconds as soon as its batch is measured; stops at ``deadline``. Returns how many
    were measured."""
    from nas.latency.protocol import measure_latency
    from nas.latency.targets import get_target, resolve_target

    target = resolve_target(settings.target, threads=settings.threads, batch_size=settings.batch_size)
    kind = get_target(settings.target).model_kind
    bar = progress(total, description, done) if progress else None
    measured = 0
    try:
        for start in range(0, len(jobs), BATCH):
            if deadline is not None and time.monotonic() >= deadline:
                logger.warning("the time limit is reached: %d of %d measured (%s); rerun to continue", done + measured, total, description)
                break
            batch = jobs[start : start + BATCH]
            batch_started = export_started = time.perf_counter()
            models: dict[int, bytes] = {}
            for index, job in enumerate(batch):
                try:
                    models[index] = job.build(kind)
                except ExportError as error:
                    logger.warning("%s cannot be exported, so it is left out of the profile: %s", job.record["arch"][:80], error)
                    store.put({**job.record, "error": f"export failed: {error}", "measurement": None})
                    measured += 1
            export_seconds = (time.perf_counter() - export_started) / len(batch)
            results = measure_latency(models, target, max_seconds=settings.measure_seconds * len(models), seed=settings.seed) if models else {}
            wall_seconds = (time.perf_counter() - batch_started) / len(batch)
            for index in models:
                timing = {"export_seconds": round(export_seconds, 4), "wall_seconds": round(wall_seconds, 4)}
                store.put({**batch[index].record, **timing, "measurement": results[index].to_dict()})
                measured += 1
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
    return measured


def build_profile(
    space: SearchSpace,
    settings: ProfileSettings,
    out: Path,
    *,
    minutes: float | None = None,
    statistic: str | None = None,
    progress: Callable[[int, str, int], Any] | None = None,
) -> ProfileResult:
    """Measure (or continue measuring) the profile of ``space`` on ``settings.target`` into ``out``, then fit and score
    the predictors (see the module docstring). ``minutes`` caps the measuring time of this call; what is left is
    measured by the next call. ``statistic`` (``p10`` or ``median``) is what the predictors are fitted on (default: the
    profile's own, else ``p10``); a rerun may change it (nothing is measured again). Raises ``ProfileError`` for a folder
    of another space, device or settings."""
    if statistic is not None and statistic not in STATISTICS:
        raise ProfileError(f"the profile statistic must be one of {list(STATISTICS)}, got {statistic!r}")
    from nas.run_lock import RunLock

    out = Path(out)
    with RunLock(out):
        fingerprint = profile_fingerprint(settings)
        if (out / PROFILE_FILE).exists():
            header = read_header(out)
            check_header(header, space, fingerprint, out)
            if header["settings"] != settings.to_dict():
                stored = header["settings"]
                differing = {key: (stored.get(key), value) for key, value in settings.to_dict().items() if stored.get(key) != value}
                raise ProfileError(
                    f"{out} was started with other settings {differing} (stored vs given): rerun with the stored ones to continue "
                    "it, or build a new profile with another --out"
                )
            archs = [Arch.from_json(entry["arch"], space, source=f"{out / PROFILE_FILE} sample") for entry in header["sample"]]
            roles = [entry["role"] for entry in header["sample"]]
        else:
            archs = design_sample(space, settings.budget, seed=settings.seed)
            if len(archs) < settings.budget:
                logger.warning("the space has only %d distinct subnets within reach, so the sample holds %d, not %d", len(archs), len(archs), settings.budget)
            roles = split_roles(space, archs)
            header = _header(space, settings, fingerprint, archs, roles)
            jsonio.write(out / PROFILE_FILE, header, nonfinite="error")
        header = {**header, "statistic": statistic or header.get("statistic") or DEFAULT_STATISTIC}
        store = Measurements(out / MEASUREMENTS_FILE)
        plan = [(arch, 1, role) for arch, role in zip(archs, roles, strict=True)]
        plan += [(arch, 2, role) for arch, role in zip(archs, roles, strict=True) if role == "test"]
        pending = [item for item in plan if store.get(item[0].to_json(), item[1]) is None]
        deadline = None if minutes is None else time.monotonic() + 60.0 * minutes
        measured = _measure(
            settings,
            store,
            _arch_jobs(space, settings, pending),
            description=f"profile {space.name} on {settings.target}",
            deadline=deadline,
            progress=progress,
            total=len(plan),
            done=len(plan) - len(pending),
        )
        pieces = PieceMeasurements(out / PIECES_FILE)
        wanted = piece_plan(space, archs)
        pending_pieces = [(identity, piece) for identity, piece in wanted.items() if pieces.get(identity, 1) is None]
        measured += _measure(
            settings,
            pieces,
            _piece_jobs(space, settings, pending_pieces),
            description=f"pieces of {space.name} on {settings.target}",
            deadline=deadline,
            progress=progress,
            total=len(wanted),
            done=len(wanted) - len(pending_pieces),
        )
        complete = all(store.get(arch.to_json(), measurement_pass) is not None for arch, measurement_pass, _ in plan)
        complete = complete and all(pieces.get(identity, 1) is not None for identity in wanted)
        planned = len(plan) + len(wanted)
        report = fit_and_score(space, out, header, archs, roles, store, complete=complete, planned=planned, pieces=pieces)
        done = len(store.records) + len(pieces.records)
        return ProfileResult(out, measured, done, planned, complete, report)


def _rank(row: dict[str, Any]) -> tuple[float, ...]:
    """How predictors are ranked for the profile's ``best``: share within +-10%, then Kendall tau, then share within
    +-5%, then the lowest MAPE (small held-out sets tie often on the first two)."""
    return (row["within_10"], row["kendall_tau"], row["within_5"], -row["mape"])


def _cost(records: list[dict[str, Any]]) -> dict[str, Any]:
    measured = [record for record in records if record["measurement"] is not None]
    seconds = sum(record.get("wall_seconds", record["measurement"]["seconds"] + record.get("export_seconds", 0.0)) for record in measured)
    failed = len(records) - len(measured)
    return {"measurements": len(measured), "minutes": round(seconds / 60.0, 2), "export_failures": failed}


def fit_and_score(
    space: SearchSpace,
    out: Path,
    header: dict[str, Any],
    archs: list[Arch],
    roles: list[str],
    store: Measurements,
    *,
    complete: bool,
    planned: int,
    pieces: Measurements | None = None,
) -> dict[str, Any]:
    """Fit ``PROFILE_PREDICTORS`` on the measured fit archs, score them on the measured held-out archs, write the
    predictors, ``quality.json``, ``quality.md`` and the profile's ``predictors`` / ``best``; returns the report."""
    statistic = header.get("statistic", "median")
    fit = [(arch, store.value(arch.to_json(), 1, statistic)) for arch, role in zip(archs, roles, strict=True) if role == "fit"]
    fit = [(arch, value) for arch, value in fit if value is not None]
    test = [
        (arch, store.value(arch.to_json(), 1, statistic), store.value(arch.to_json(), 2, statistic))
        for arch, role in zip(archs, roles, strict=True)
        if role == "test"
    ]
    test_first = [(arch, first) for arch, first, _ in test if first is not None]
    test_both = [(arch, first, second) for arch, first, second in test if first is not None and second is not None]
    fingerprint = header["fingerprint"]
    rows: dict[str, Any] = {}
    fitted: list[str] = []
    records = list(store.records.values()) + (list(pieces.records.values()) if pieces is not None else [])
    table = piece_table(space, pieces, statistic) if pieces is not None else None
    for name in PROFILE_PREDICTORS:
        if name in TABLE_PREDICTORS and table is None:
            rows[name] = {"error": "no piece measured yet"}
            continue
        options = {"table": table} if name in TABLE_PREDICTORS else {}
        predictor = create_predictor(name, space, seed=header["settings"]["seed"], **options)
        if len(fit) < max(predictor.min_measurements, 2):
            rows[name] = {"error": f"{len(fit)} fit measurements, fewer than the {max(predictor.min_measurements, 2)} it needs"}
            continue
        started = time.perf_counter()
        predictor.fit([arch for arch, _ in fit], [value for _, value in fit], fingerprint)
        fit_seconds = time.perf_counter() - started
        predictor.save(out / PREDICTORS_FOLDER / name)
        fitted.append(name)
        row: dict[str, Any] = {"fit_measurements": len(fit), "fit_seconds": round(fit_seconds, 3)}
        if test_first:
            row.update(quality(predictor.predict([arch for arch, _ in test_first]), [value for _, value in test_first]).to_dict())
        rows[name] = row
    noise = quality([second for _, _, second in test_both], [first for _, first, _ in test_both]).to_dict() if test_both else None
    scored = [name for name in fitted if "within_10" in rows[name]]
    best = max(scored, key=lambda name: _rank(rows[name])) if scored else (fitted[0] if fitted else None)
    latencies = [value for _, value in fit] + [value for _, value in test_first]
    report = {
        "space": space.name,
        "target": header["settings"]["target"],
        "fingerprint_key": header["fingerprint_key"],
        "cpu_model": fingerprint.get("cpu_model"),
        "statistic": statistic,
        "gpu": fingerprint.get("gpu"),
        "complete": complete,
        "measured": len(records),
        "planned": planned,
        "fit_archs": len(fit),
        "test_archs": len(test_first),
        "pieces": 0 if table is None else len(table.entries),
        "latency_range_ms": [min(latencies), max(latencies)] if latencies else None,
        "cost": _cost(records),
        "predictors": rows,
        "noise_floor": noise,
        "best": best,
    }
    jsonio.write(out / QUALITY_JSON, report, nonfinite="null")
    (out / QUALITY_MARKDOWN).write_text(quality_markdown(report))
    header = {**header, "predictors": fitted, "best": best}
    jsonio.write(out / PROFILE_FILE, header, nonfinite="error")
    return report


def _percent(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{100 * value:.1f}%"


def _number(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.3f}"


def quality_table(rows: dict[str, Any], noise: dict[str, Any] | None) -> list[str]:
    """Markdown rows: one per predictor, then the noise floor (a second measurement against the first)."""
    lines = ["| predictor | held-out archs | within +-5% | within +-10% | MAPE | Kendall tau |", "|---|---|---|---|---|---|"]
    for name, row in rows.items():
        if "error" in row:
            lines.append(f"| {name} | not fitted: {row['error']} | | | | |")
            continue
        lines.append(
            f"| {name} | {row.get('count', 0)} | {_percent(row.get('within_5'))} | {_percent(row.get('within_10'))} | {_percent(row.get('mape'))} | "
            f"{_number(row.get('kendall_tau'))} |"
        )
    if noise is not None:
        lines.append(
            f"| noise floor (2nd measurement vs 1st) | {noise['count']} | {_percent(noise['within_5'])} | {_percent(noise['within_10'])} | "
            f"{_percent(noise['mape'])} | {_number(noise['kendall_tau'])} |"
        )
    return lines


def quality_markdown(report: dict[str, Any]) -> str:
    span = report["latency_range_ms"]
    measured = f"{report['measured']} of {report['planned']} planned measurements"
    if not report["complete"]:
        measured += " (incomplete: rerun `nas profile` with the same settings to continue)"
    if report["cost"].get("export_failures"):
        measured += f"; {report['cost']['export_failures']} could not be exported and are left out (their errors are in the measurement files)"
    lines = [
        f"# Hardware profile: {report['space']} on {report['target']}",
        "",
        f"Device {report['cpu_model']}" + (f", GPU {report['gpu']}" if report.get("gpu") else "") + f" (fingerprint {report['fingerprint_key']}).",
        f"{measured} ({report.get('pieces', 0)} of them pieces measured alone for the look-up table), {report['cost']['minutes']} minutes of "
        f"export and measurement; {report['fit_archs']} archs fitted, {report['test_archs']} held out"
        + (f"; latencies {span[0]:.4g} .. {span[1]:.4g} ms ({report['statistic']} of each measurement)." if span else "."),
        "",
        *quality_table(report["predictors"], report["noise_floor"]),
        "",
        f"Best: {report['best']}." if report["best"] else "Best: none (too few measurements to fit a predictor: raise --budget).",
    ]
    if report["noise_floor"]:
        lines.append(
            "The noise floor row is a second measurement of the same held-out archs against the first: no predictor can be shown "
            "to be closer than that to one fresh measurement."
        )
    if report["test_archs"] < WEAK_HELD_OUT:
        lines.append(
            f"Only {report['test_archs']} held-out arch(s): these figures say little (Kendall tau needs many to mean anything); "
            "raise --budget, or check the profile with `nas profile ... --check 20`."
        )
    lines.append("")
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class HardwareProfile:
    """A profile read for one space and device: its header and the folder its predictors live in."""

    folder: Path
    header: dict[str, Any]
    space: SearchSpace

    @property
    def target(self) -> str:
        return str(self.header["settings"]["target"])

    @property
    def best(self) -> str | None:
        return self.header.get("best")

    @property
    def complete(self) -> bool:
        """Whether every planned measurement was taken (``quality.json``); an incomplete profile still predicts."""
        try:
            return bool(jsonio.loads((self.folder / QUALITY_JSON).read_text()).get("complete"))
        except (OSError, ValueError):
            return False

    @property
    def statistic(self) -> str:
        """What the predictors predict: ``p10`` or ``median`` milliseconds of a measurement."""
        return str(self.header.get("statistic", "median"))

    def predictor(self, name: str | None = None) -> LatencyPredictor:
        """The fitted predictor ``name`` (default: the profile's best), already checked against the profile's
        fingerprint (which was checked against the device when the profile was loaded)."""
        chosen = name or self.best
        fitted = self.header.get("predictors", [])
        if chosen is None:
            raise ProfileError(
                f"{self.folder} has no fitted predictor yet (its measurement did not finish, or too few subnets were measured): "
                "rerun `nas profile` with the same settings to finish it"
            )
        if chosen not in fitted:
            raise ProfileError(f"{self.folder} holds no fitted predictor {chosen!r}; it has {fitted}")
        return LatencyPredictor.load(self.folder / PREDICTORS_FOLDER / chosen, self.space, fingerprint=self.header["fingerprint"])


def load_profile(folder: Path, space: SearchSpace, *, fingerprint: dict[str, Any] | None) -> HardwareProfile:
    """The profile in ``folder`` for ``space`` on the device and setting of ``fingerprint`` (``None``: no device check,
    on purpose). Raises ``ProfileError`` (another space, unreadable) or ``ForeignFingerprintError`` (another device)."""
    folder = Path(folder)
    header = read_header(folder)
    check_header(header, space, fingerprint, folder)
    return HardwareProfile(folder, header, space)


def profile_roots() -> list[Path]:
    """Where profiles are found by device, in order: ``$NASFORGE_PROFILES`` (``:`` separated), ``./profiles`` (where
    ``nas profile`` writes by default), the shipped ``hardware_profiles/``."""
    from nas import hardware_profiles

    roots = [Path(entry) for entry in os.environ.get("NASFORGE_PROFILES", "").split(os.pathsep) if entry]
    return [*roots, Path(DEFAULT_ROOT), Path(hardware_profiles.__file__).parent]


def find_profile(space: SearchSpace, fingerprint: dict[str, Any], *, roots: Sequence[Path] | None = None) -> HardwareProfile:
    """The profile of ``space`` measured on this device and setting (same fingerprint key), searched under ``roots``
    (default ``profile_roots()``). Raises ``ProfileError`` saying what was looked at, and why each near miss (same
    space and target, other device) was not used."""
    from nas.latency.fingerprint import describe_differences, fingerprint_differences, fingerprint_key

    key = fingerprint_key(fingerprint)
    near: list[str] = []
    searched = list(roots if roots is not None else profile_roots())
    for root in searched:
        for path in sorted(Path(root).glob(f"**/{PROFILE_FILE}")):
            try:
                header = read_header(path.parent)
            except ProfileError:
                continue
            if header.get("space") != space.name or header["settings"].get("target") != fingerprint.get("target"):
                continue
            differences = fingerprint_differences(header["fingerprint"], fingerprint)
            if not differences and header.get("space_digest") == space_digest(space):
                return HardwareProfile(path.parent, header, space)
            why = describe_differences(differences) if differences else "the space changed since"
            near.append(f"{path.parent} ({why})")
    raise ProfileError(
        f"no hardware profile of space {space.name!r} on target {fingerprint.get('target')!r} for this device (key {key}) under "
        f"{[str(root) for root in searched]}"
        + (f"; not used: {'; '.join(near)}" if near else "")
        + f". Measure one: `nas profile <this space's file or name> --target {fingerprint.get('target')}` (it writes under ./profiles, where "
        "it is found), or pass its folder with --profile"
    )


def check_profile(
    profile: HardwareProfile,
    settings: ProfileSettings,
    *,
    count: int,
    progress: Callable[[int, str, int], Any] | None = None,
) -> dict[str, Any]:
    """Measure ``count`` fresh archs (not in the profile's sample) twice and score every predictor of the profile
    against the first measurement, beside the second one (the noise floor); the result is written to
    ``checks/<time>.json`` in the profile and returned."""
    from nas.run_lock import RunLock

    with RunLock(profile.folder):
        sampled = {entry["arch"] for entry in profile.header["sample"]}
        checks = profile.folder / CHECKS_FOLDER
        checks.mkdir(exist_ok=True)
        previous = len(list(checks.glob("*.json")))
        candidates = design_sample(profile.space, count + len(sampled) + 2, seed=settings.seed + 1000 + previous)
        fresh = [arch for arch in candidates if arch.to_json() not in sampled][:count]
        with tempfile.TemporaryDirectory(prefix="nasforge-check-") as folder:
            store = Measurements(Path(folder) / MEASUREMENTS_FILE)
            plan = [(arch, 1, "check") for arch in fresh] + [(arch, 2, "check") for arch in fresh]
            jobs = _arch_jobs(profile.space, settings, plan)
            _measure(settings, store, jobs, description=f"check of {profile.folder}", deadline=None, progress=progress, total=len(plan), done=0)
            first = np.asarray([store.value(arch.to_json(), 1, profile.statistic) for arch in fresh], dtype=np.float64)
            second = np.asarray([store.value(arch.to_json(), 2, profile.statistic) for arch in fresh], dtype=np.float64)
            cost = _cost(list(store.records.values()))
        rows = {name: quality(profile.predictor(name).predict(fresh), first).to_dict() for name in profile.header["predictors"]}
        result = {
            "space": profile.space.name,
            "target": profile.target,
            "archs": len(fresh),
            "statistic": profile.statistic,
            "fresh_archs": [arch.to_json() for arch in fresh],
            "cost": cost,
            "predictors": rows,
            "noise_floor": quality(second, first).to_dict(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        jsonio.write(checks / f"{time.strftime('%Y%m%d-%H%M%S')}-{previous}.json", result, nonfinite="null")
        return result


__all__ = [
    "PROFILE_PREDICTORS",
    "HardwareProfile",
    "ProfileError",
    "ProfileResult",
    "ProfileSettings",
    "Quality",
    "build_profile",
    "check_profile",
    "design_sample",
    "find_profile",
    "load_profile",
    "quality",
    "quality_markdown",
    "quality_table",
    "space_digest",
    "split_roles",
]
