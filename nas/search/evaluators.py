"""Candidate evaluation for the search: accuracy with inherited weights and the ONNX files latency is measured on.

An ``Evaluator`` holds one copy of the trained supernet and the few batches it needs (BN calibration, the
validation split, INT8 calibration). It is built once per process, never per trial, from an ``EvaluatorPayload``
that travels by value (through Ray's object store on a cluster), so workers need no shared file system.

Pools run evaluators: ``InProcessPool`` (``--workers 1``, no Ray) and ``RayPool`` (N actors with one thread each on
a local Ray or an existing cluster). A pool's ``map`` yields one ``Outcome`` per arch; an actor that dies has its arch
retried on a fresh actor, up to ``max_retries`` times, and the run goes on.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from nas.data.splits import Split
from nas.ray_connect import connect, import_ray
from nas.supernets.costs import arch_cost
from nas.supernets.space import Arch
from nas.training.evaluation import CalibrationBatches, prepare_batch, recalibrate_batch_norm

logger = logging.getLogger(__name__)

SEARCH_PURPOSE = "parallel search (--workers > 1 or --address)"


@dataclass(frozen=True, slots=True)
class EvaluatorPayload:
    """Everything an evaluator needs, by value.

    Attributes:
        config_text: the run's YAML (the space is rebuilt from it).
        base_dir: the folder the space file came from (its ``plugins:`` are imported relative to it).
        state: the supernet's ``state_dict``.
        calibration: the run's BN calibration batches (``run_calibration_batches``: the same samples, batches and
            order as training's final metrics and the export use).
        validation: the split accuracy is measured on.
        int8_calibration: training inputs ``[N, ...]`` that calibrate INT8 activation ranges (the export's,
            ``int8_calibration_inputs``).
        int8: whether INT8 models are needed (an INT8 latency target is searched).
    """

    config_text: str
    state: dict[str, torch.Tensor]
    calibration: CalibrationBatches
    validation: Split
    int8_calibration: torch.Tensor
    int8: bool
    base_dir: str | None = None


@dataclass(frozen=True, slots=True)
class Evaluation:
    """One arch's evaluation: costs, its ONNX files as bytes (``"fp32"``, ``"int8"``) and their validation accuracy
    (``onnx_accuracy`` of those very files, which are what the export writes for the arch).

    ``int8_error`` says why the arch has no INT8 model (its agreement with fp32 is below ``MIN_INT8_AGREEMENT``, the
    rule the export applies); the INT8 bytes are still there, so that every trial has an INT8 latency."""

    arch_json: str
    accuracy: float
    params: int
    macs: int
    models: dict[str, bytes]
    int8_top1_agreement: float | None
    seconds: float
    worker: str = ""
    int8_accuracy: float | None = None
    int8_error: str | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a pool returns for one arch: an ``Evaluation`` or the error that stopped it (after retries)."""

    arch_json: str
    evaluation: Evaluation | None = None
    error: str | None = None
    attempts: int = 1


class EvaluatorStartError(RuntimeError):
    """The evaluators could not be built (on a cluster: a node without nasforge installed, say)."""


class Evaluator:
    """Evaluates archs of one trained supernet (built once) with ``threads`` intra-op threads. The thread count is
    set only while it works and restored afterwards, so an in-process evaluator leaves the caller's torch as it was."""

    def __init__(self, payload: EvaluatorPayload, threads: int = 1) -> None:
        from nas.space.schema import parse_config
        from nas.training.checkpoint import build_supernet

        self.threads = threads
        config = parse_config(payload.config_text, "<run config>", base_dir=Path(payload.base_dir) if payload.base_dir else None, check_constraints=False)
        self.space = config.space
        self.payload = payload
        self.supernet = build_supernet(config)
        self.supernet.load_state_dict(payload.state)
        self.supernet.eval()
        self.worker = f"{os.uname().nodename}:{os.getpid()}"

    def evaluate(self, arch_json: str) -> Evaluation:
        """Recalibrate BN for the arch (the run's calibration batches), extract it, write its ONNX files as the
        export does (fp32 checked against PyTorch; INT8 static QDQ when needed) and score those files on the
        validation split."""
        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            return self._evaluate(arch_json)
        finally:
            torch.set_num_threads(previous)

    def _evaluate(self, arch_json: str) -> Evaluation:
        from nas.export import onnx

        started = time.perf_counter()
        arch = Arch.from_json(arch_json, self.space, source="the study's arch")
        payload = self.payload
        recalibrate_batch_norm(self.supernet, arch, payload.calibration)
        static = self.supernet.extract(arch).eval()
        params, macs = arch_cost(self.space, arch)
        validation = prepare_batch(payload.validation.inputs, payload.validation.targets, arch)[0]
        calibration = prepare_batch(payload.int8_calibration, payload.int8_calibration, arch)[0]
        models: dict[str, bytes] = {}
        agreement = int8_accuracy = int8_error = None
        with tempfile.TemporaryDirectory(prefix="nasforge-eval-") as folder:
            fp32_path = Path(folder) / "model.onnx"
            onnx.export_onnx(static, calibration[:2], fp32_path, arch=arch, space_name=self.space.name, check_inputs=validation[:16])
            models["fp32"] = fp32_path.read_bytes()
            value = onnx.onnx_accuracy(fp32_path, arch, payload.validation)
            if payload.int8:
                int8_path = Path(folder) / "model.int8.onnx"
                result = onnx.quantize_int8(fp32_path, int8_path, calibration=calibration, validation=validation, min_agreement=0.0)
                models["int8"] = int8_path.read_bytes()
                agreement = result.int8_top1_agreement
                assert agreement is not None
                int8_accuracy = onnx.onnx_accuracy(int8_path, arch, payload.validation)
                if not agreement >= onnx.MIN_INT8_AGREEMENT:
                    int8_error = (
                        f"INT8 top-1 agreement with fp32 is {agreement:.4f} on {len(validation)} validation inputs, "
                        f"below the required {onnx.MIN_INT8_AGREEMENT:.4f}: no INT8 model"
                    )
        seconds = time.perf_counter() - started
        return Evaluation(arch_json, value, params, macs, models, agreement, seconds, self.worker, int8_accuracy, int8_error)


class Pool(Protocol):
    workers: int

    def map(self, arch_jsons: Iterable[str]) -> Iterator[Outcome]: ...

    def close(self) -> None: ...


EvaluatorFactory = Callable[[EvaluatorPayload], Any]


class InProcessPool:
    """``--workers 1``: evaluates in this process, in order; no Ray."""

    workers = 1

    def __init__(self, payload: EvaluatorPayload, factory: EvaluatorFactory = Evaluator) -> None:
        self.evaluator = factory(payload)

    def map(self, arch_jsons: Iterable[str]) -> Iterator[Outcome]:
        for arch_json in arch_jsons:
            try:
                yield Outcome(arch_json, self.evaluator.evaluate(arch_json))
            except Exception as error:  # noqa: BLE001 - one broken candidate must not end the search
                logger.warning("evaluating %s failed: %s", arch_json, error)
                yield Outcome(arch_json, error=f"{type(error).__name__}: {error}")

    def close(self) -> None:
        self.evaluator = None


def _ray() -> Any:
    return import_ray(SEARCH_PURPOSE)


@dataclass
class _Pending:
    arch_json: str
    attempts: int = 0


@dataclass
class RayPool:
    """N evaluator actors (one CPU and one thread each) on a local Ray or the cluster at ``address``.

    The payload is put in the object store once; each actor builds its ``Evaluator`` from it once. ``map`` keeps
    every actor busy, yields outcomes as they finish, and when an actor dies (``RayActorError``: the process
    crashed or its node left) replaces it and retries the arch, at most ``max_retries`` times.
    """

    payload: EvaluatorPayload
    workers: int
    address: str | None = None
    factory: EvaluatorFactory = Evaluator
    max_retries: int = 2
    started_ray: bool = False
    actors: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        ray = _ray()
        self.started_ray = connect(self.address, self.workers, SEARCH_PURPOSE)
        self._remote_class = ray.remote(num_cpus=1, max_restarts=0)(_RemoteEvaluator)
        self._payload_ref = ray.put(self.payload)
        self.actors = [self._new_actor(index) for index in range(self.workers)]
        try:
            ray.get([actor.ready.remote() for actor in self.actors])
        except Exception as error:
            self.close()
            raise EvaluatorStartError(f"the Ray evaluators could not start: {error}") from None

    def _new_actor(self, index: int) -> Any:
        """Actor ``index``; on a local Ray it is pinned to core ``index`` (mod the core count), so that the
        thread pools ONNX Runtime's quantization tools start with default sizes cannot spill onto other workers."""
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        core = cores[index % len(cores)] if cores and not self.address else None
        return self._remote_class.remote(self._payload_ref, self.factory, core)

    def map(self, arch_jsons: Iterable[str]) -> Iterator[Outcome]:
        ray = _ray()
        from ray.exceptions import RayActorError, RayTaskError

        queue = deque(_Pending(arch_json) for arch_json in arch_jsons)
        idle = deque(range(len(self.actors)))
        running: dict[Any, tuple[int, _Pending]] = {}
        while queue or running:
            while queue and idle:
                index = idle.popleft()
                pending = queue.popleft()
                pending.attempts += 1
                running[self.actors[index].evaluate.remote(pending.arch_json)] = (index, pending)
            done, _ = ray.wait(list(running), num_returns=1)
            for reference in done:
                index, pending = running.pop(reference)
                try:
                    evaluation = ray.get(reference)
                except RayActorError as error:
                    logger.warning("evaluator %d died on %s (%s); starting a new one", index, pending.arch_json, error)
                    ray.kill(self.actors[index], no_restart=True)
                    self.actors[index] = self._new_actor(index)
                    if pending.attempts <= self.max_retries:
                        queue.appendleft(pending)
                    else:
                        yield Outcome(pending.arch_json, error=f"evaluator died {pending.attempts} times", attempts=pending.attempts)
                except RayTaskError as error:
                    cause = error.cause if error.cause is not None else error
                    yield Outcome(pending.arch_json, error=f"{type(cause).__name__}: {cause}", attempts=pending.attempts)
                else:
                    yield Outcome(pending.arch_json, evaluation, attempts=pending.attempts)
                idle.append(index)

    def close(self) -> None:
        ray = _ray()
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
        if self.started_ray:
            ray.shutdown()
            self.started_ray = False


class _RemoteEvaluator:
    """The Ray actor body: one evaluator, built once from the payload in the object store."""

    def __init__(self, payload: EvaluatorPayload, factory: EvaluatorFactory, core: int | None = None) -> None:
        if core is not None:
            os.sched_setaffinity(0, {core})
        self.evaluator = factory(payload)

    def ready(self) -> str:
        return self.evaluator.worker if hasattr(self.evaluator, "worker") else str(os.getpid())

    def evaluate(self, arch_json: str) -> Evaluation:
        import dataclasses

        import ray

        evaluation = self.evaluator.evaluate(arch_json)
        node = ray.get_runtime_context().get_node_id()[:12]
        return dataclasses.replace(evaluation, worker=f"{evaluation.worker} (ray node {node})")


def make_pool(payload: EvaluatorPayload, *, workers: int, address: str | None, factory: EvaluatorFactory = Evaluator) -> Pool:
    """``InProcessPool`` for one local worker, else a ``RayPool``."""
    if workers <= 1 and not address:
        return InProcessPool(payload, factory)
    return RayPool(payload, workers, address, factory)


__all__ = ["Evaluation", "Evaluator", "EvaluatorPayload", "EvaluatorStartError", "InProcessPool", "Outcome", "RayPool", "make_pool"]
