"""Evaluation of subnets: batch preparation, BN recalibration and accuracy.

BN recalibration has one path. ``calibration_batches`` draws a run's calibration batches once (the samples, their
batches and their order are a function of the training split, ``training.batch_size``,
``training.calibration_batches`` and ``training.seed``); ``recalibrate_batch_norm`` runs exactly those batches, in
that order. Training's final metrics, the search's evaluators (which receive the ``CalibrationBatches`` by value),
the export and the benchmarks all go through it, so a subnet's batch norm statistics, and therefore its accuracy,
are the same wherever it is computed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from nas.data.splits import Split, iterate_batches
from nas.space.schema import RunConfig
from nas.supernets.space import Arch
from nas.supernets.supernet import Supernet, resize_input


@dataclass(frozen=True, slots=True)
class CalibrationBatches:
    """The BN calibration batches of a run, by value (they travel to search workers as they are).

    Attributes:
        inputs: training inputs ``[N, ...]`` in the order the batches take them (``N = batch_size * batches``, fewer
            when the training split is smaller).
        batch_size: batch ``k`` is ``inputs[k * batch_size : (k + 1) * batch_size]``.
    """

    inputs: torch.Tensor
    batch_size: int

    def __iter__(self) -> Iterator[torch.Tensor]:
        for start in range(0, int(self.inputs.shape[0]), self.batch_size):
            yield self.inputs[start : start + self.batch_size]

    def __len__(self) -> int:
        return (int(self.inputs.shape[0]) + self.batch_size - 1) // self.batch_size


def calibration_batches(train: Split, *, batch_size: int, num_batches: int, seed: int) -> CalibrationBatches:
    """The first ``num_batches`` batches of ``batch_size`` of ``train`` shuffled by ``torch.randperm`` seeded with
    ``seed`` (what ``iterate_batches(train, batch_size, shuffle=True)`` yields first with that generator)."""
    if batch_size < 1 or num_batches < 1:
        raise ValueError(f"batch_size and num_batches must be at least 1, got {batch_size} and {num_batches}")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(int(train.inputs.shape[0]), generator=generator)[: batch_size * num_batches]
    return CalibrationBatches(train.inputs[order].contiguous(), batch_size)


def run_calibration_batches(config: RunConfig, train: Split) -> CalibrationBatches:
    """``calibration_batches`` with the run's ``training.batch_size``, ``training.calibration_batches`` and
    ``training.seed``: the batches every recalibration of the run uses."""
    training = config.training
    return calibration_batches(train, batch_size=training.batch_size, num_batches=training.calibration_batches, seed=training.seed)


def prepare_batch(inputs: torch.Tensor, targets: torch.Tensor, arch: Arch) -> tuple[torch.Tensor, torch.Tensor]:
    """Adapt a batch to ``arch``: images resized to its resolution; sequences cut to its length (MQAR's key-value
    prefix stays, so every remaining target is still answerable)."""
    if arch.sequence_length is not None:
        return inputs[:, : arch.sequence_length], targets[:, : arch.sequence_length]
    return resize_input(inputs, arch), targets


def recalibrate_batch_norm(supernet: Supernet, arch: Arch, calibration: CalibrationBatches) -> None:
    """Reset the running statistics of every batch norm and re-estimate them for ``arch`` as a cumulative average
    over the ``calibration`` batches, in their order. Leaves the supernet in eval mode with ``arch`` active."""
    supernet.set_active(arch)
    norms = supernet.batch_norms()
    supernet.eval()
    if not norms:
        return
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
        norm.train()
    with torch.no_grad():
        for inputs in calibration:
            supernet(prepare_batch(inputs, inputs, arch)[0])
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
    supernet.eval()


def correct_and_total(logits: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
    """Top-1 hits and scored count. image logits: [B, C], targets [B]; sequence: [B, L, C], targets [B, L] (-100 unscored)."""
    mask = targets != -100
    hits = (logits.argmax(dim=-1) == targets) & mask
    return int(hits.sum()), int(mask.sum())


@torch.no_grad()
def accuracy(model: nn.Module, arch: Arch, split: Split, *, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` (a supernet with ``arch`` active, or a static subnet) on ``split``."""
    model.eval()
    correct = total = 0
    for inputs, targets in iterate_batches(split, batch_size, shuffle=False):
        inputs, targets = prepare_batch(inputs, targets, arch)
        hits, count = correct_and_total(model(inputs), targets)
        correct += hits
        total += count
    return correct / max(total, 1)


def evaluate_arch(supernet: Supernet, arch: Arch, calibration: CalibrationBatches, split: Split) -> float:
    """Accuracy of ``arch`` with inherited weights after BN recalibration on ``calibration``."""
    recalibrate_batch_norm(supernet, arch, calibration)
    return accuracy(supernet, arch, split)
