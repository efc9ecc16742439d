"""Data parallelism for the training stages, whoever started the processes (Ray Train's TorchTrainer, or one
process without torch.distributed: a world of one, the same code).

Every process holds the same examples and draws the same global batches; each computes its contiguous share
of a batch's rows through DistributedDataParallel, and contrastive stages gather the features of every share
(with their gradients) so that each image is contrasted with the whole global batch: the gradients equal those
of one process computing the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class Parallel:
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where collectives' tensors live

    @classmethod
    def current(cls, device: torch.device) -> Parallel:
        """The process group torch.distributed was initialised with, else a world of one."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), device)
        return cls(device=device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def usable_batch(self, batch_size: int) -> int:
        """The largest batch of at most `batch_size` rows that splits evenly across the processes."""
        return max(self.world_size, batch_size - batch_size % self.world_size)

    def share(self, rows: list[int]) -> list[int]:
        """This process's rows of a global batch: contiguous and in rank order, so gathered features line up
        with the batch. The batch must split evenly (`usable_batch`)."""
        size = len(rows) // self.world_size
        return rows[self.rank * size:(self.rank + 1) * size]

    def wrap(self, module: torch.nn.Module, find_unused_parameters: bool = False) -> torch.nn.Module:
        """DDP around `module` (its forward must be what computes the loss's inputs); itself in a world of one."""
        if self.world_size == 1:
            return module
        device_ids = [self.device.index if self.device.index is not None else 0] if self.device.type == "cuda" \
            else None
        return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=find_unused_parameters)

    def gather(self, features: torch.Tensor) -> torch.Tensor:
        """Every process's `features` concatenated in rank order; gradients flow back to each process's own."""
        if self.world_size == 1:
            return features
        from torch.distributed import _functional_collectives as collectives

        return collectives.all_gather_single(features.contiguous(), 0, dist.group.WORLD)

    def mean(self, value: float) -> float:
        """The mean of `value` over the processes."""
        if self.world_size == 1:
            return value
        total = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return total.item() / self.world_size

    def gather_objects(self, value: object) -> list:
        """Every process's `value` (picklable), in rank order."""
        if self.world_size == 1:
            return [value]
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def share_file(self, path: Path) -> None:
        """The main process's file `path` written with the same bytes by every other process."""
        if self.world_size == 1:
            return
        content = [path.read_bytes() if self.is_main else None]
        dist.broadcast_object_list(content, src=0, device=self.device)
        if not self.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content[0])


ONE_PROCESS = Parallel()  # a process that trains alone, on the CPU
