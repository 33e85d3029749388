"""Evaluation of subnets: batch preparation, BN recalibration and accuracy."""

from __future__ import annotations

import torch
from torch import nn

from nas.data.splits import Split, iterate_batches
from nas.supernets.space import Arch
from nas.supernets.supernet import Supernet, resize_input


def prepare_batch(inputs: torch.Tensor, targets: torch.Tensor, arch: Arch) -> tuple[torch.Tensor, torch.Tensor]:
    """Adapt a batch to ``arch``: images resized to its resolution; sequences cut to its length (MQAR's key-value
    prefix stays, so every remaining target is still answerable)."""
    if arch.sequence_length is not None:
        return inputs[:, : arch.sequence_length], targets[:, : arch.sequence_length]
    return resize_input(inputs, arch), targets


def recalibrate_batch_norm(supernet: Supernet, arch: Arch, split: Split, *, batch_size: int, num_batches: int, seed: int = 0) -> None:
    """Reset the running statistics of every batch norm and re-estimate them for ``arch`` as a cumulative average
    over ``num_batches`` training batches drawn with ``seed``. Leaves the supernet in eval mode with ``arch`` active."""
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
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for index, (inputs, targets) in enumerate(iterate_batches(split, batch_size, shuffle=True, generator=generator)):
            if index >= num_batches:
                break
            supernet(prepare_batch(inputs, targets, arch)[0])
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


def evaluate_arch(supernet: Supernet, arch: Arch, train: Split, split: Split, *, batch_size: int, calibration_batches: int, seed: int = 0) -> float:
    """Accuracy of ``arch`` with inherited weights after BN recalibration on ``train``."""
    recalibrate_batch_norm(supernet, arch, train, batch_size=batch_size, num_batches=calibration_batches, seed=seed)
    return accuracy(supernet, arch, split)
