"""The data-parallel group one training process belongs to, and the little communication training needs.

A run trained by N workers is the same job as a run trained by one: every worker draws the same batch order, the
same augmentation and the same subnets from generators seeded with ``(seed, epoch)`` (``nas.training.loop``), trains
its ``rows`` of each global batch, and the gradients are averaged once per optimizer update, so every worker applies
the same update to the same weights. The average of the workers' mean losses is the mean loss of the global batch
when each share scores as many items (images always; sequences when every sample scores the same number of
positions).

What differs from one worker at the same global batch: batch-norm statistics are those of each worker's share
(``B / N`` samples, as in DDP without SyncBatchNorm; Once-for-All trained so, with 64 images per GPU), and sums are
reduced in another order (float32 rounding). Running statistics are averaged across workers at the end of every
epoch, so the checkpoint holds one set.

Gradients are averaged explicitly, one flat all-reduce per update, instead of by wrapping the supernet in
``DistributedDataParallel``: a step of the sandwich rule accumulates the gradients of several subnets, each of which
leaves other weights unused, before one update. DDP would reduce after every backward unless told ``no_sync``, and
would need ``find_unused_parameters`` to discover per subnet what our workers know by construction (all of them
train the same subnet). A sentinel in the reduced buffer checks that every worker holds the same gradients.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn


class WorkerMismatchError(RuntimeError):
    """Workers of one run disagree on what they train (a bug: they must draw the same subnets)."""


@dataclass(frozen=True, slots=True)
class World:
    """Rank ``rank`` of ``size`` data-parallel workers; ``World()`` is one process, with no communication.

    With ``size > 1`` the default ``torch.distributed`` process group must be initialised (Ray Train's TorchTrainer
    does so: gloo on CPU, NCCL on GPU)."""

    rank: int = 0
    size: int = 1

    @property
    def writes(self) -> bool:
        """Whether this worker writes the run folder (checkpoints, log, metrics): rank 0 only."""
        return self.rank == 0

    def check_batch(self, batch_size: int) -> None:
        if batch_size % self.size:
            raise ValueError(f"training.batch_size ({batch_size}) must be a multiple of the number of workers ({self.size}): each trains an equal share")

    def rows(self, batch_size: int) -> slice | None:
        """The rows of a global batch of ``batch_size`` that this worker trains (None: all of them)."""
        if self.size == 1:
            return None
        share = batch_size // self.size
        return slice(self.rank * share, (self.rank + 1) * share)

    def average_gradients(self, parameters: Iterable[nn.Parameter]) -> None:
        """Replace every gradient with its mean over the workers: one all-reduce of one flat buffer, plus a
        sentinel (the number of gradients) that must come back ``size`` times itself."""
        if self.size == 1:
            return
        gradients = [parameter.grad for parameter in parameters if parameter.grad is not None]
        total = _average_in_place(gradients, self.size, sentinel=float(len(gradients)))
        if int(total) != len(gradients) * self.size:
            raise WorkerMismatchError(
                f"worker {self.rank} has {len(gradients)} gradients, but the workers' total is {int(total)}: they trained different subnets"
            )

    def average_buffers(self, module: nn.Module) -> None:
        """Average every floating-point buffer (batch-norm running statistics) over the workers."""
        if self.size > 1:
            _average_in_place([buffer for buffer in module.buffers() if buffer.is_floating_point()], self.size)

    def sum(self, values: list[float]) -> list[float]:
        """The element-wise sum of ``values`` over the workers (float64)."""
        if self.size == 1:
            return list(values)
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor)
        return [float(value) for value in tensor]

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()


def _average_in_place(tensors: list[torch.Tensor], size: int, sentinel: float = 0.0) -> float:
    """Divide the sum over the ``size`` workers of each tensor by ``size``, in place, with one all-reduce of one
    flat float32 buffer that carries ``sentinel`` at its end; returns the sentinel's sum over the workers."""
    import torch.distributed as dist

    flat = torch.cat([tensor.reshape(-1).float() for tensor in tensors] + [torch.tensor([sentinel])])
    dist.all_reduce(flat)
    offset = 0
    for tensor in tensors:
        count = tensor.numel()
        tensor.copy_((flat[offset : offset + count] / size).view_as(tensor))
        offset += count
    return float(flat[-1])


__all__ = ["World", "WorkerMismatchError"]
