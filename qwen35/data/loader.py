"""Micro-batches of packed rows in a deterministic, resumable order, sharded over ranks.

Every epoch visits the rows in a fresh order drawn from (seed, epoch). The epoch's order is cut
into global micro-batches of `world_size * micro_batch_size` rows; rank r takes the r-th slice of
each, so ranks see disjoint rows and together every row. When the row count does not divide, the
order wraps around to fill the last global micro-batch (as torch's DistributedSampler does):
every rank must run the same number of micro-batches, or the collectives of the last step hang.

The position is two numbers: the epoch, and how many rows of its order all ranks together have
consumed. That is what `state_dict()` returns and `load_state_dict()` restores, so a resumed run
gets exactly the micro-batch that would have come next. Counting rows over all ranks, rather than
micro-batches of one rank, lets a run resume on a different number of GPUs at a step boundary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch

from qwen35.data.pack import collate


class PackedLoader:
    def __init__(self, dataset: torch.utils.data.Dataset, micro_batch_size: int = 1, *,
                 seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 collate_fn: Callable[[list[dict]], dict] = collate, num_workers: int = 0):
        """`num_workers` > 0 builds the rows in that many worker processes (torch's DataLoader,
        a few micro-batches ahead): image-text rows decode their images there."""
        if len(dataset) == 0:
            raise ValueError("the data set has no rows: no sample survived reading and packing")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        self.dataset, self.micro_batch_size, self.seed = dataset, micro_batch_size, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.collate_fn, self.num_workers = collate_fn, num_workers
        self.epoch, self.index = 0, 0

    @property
    def rows_per_step(self) -> int:
        """Rows one micro-batch takes over all ranks."""
        return self.world_size * self.micro_batch_size

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches each rank runs per epoch."""
        return -(-len(self.dataset) // self.rows_per_step)

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's row order, wrapped to a whole number of global micro-batches."""
        n = len(self.dataset)
        rows = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        return np.resize(rows, self.batches_per_epoch * self.rows_per_step)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Micro-batches from the current position on, epoch after epoch, without end: the trainer
        decides when to stop. The position moves before each batch is handed out, so `state_dict()`
        taken after a batch names the one after it."""
        while True:
            order = self.order(self.epoch)
            mine = [order[i + self.rank * self.micro_batch_size:][:self.micro_batch_size].tolist()
                    for i in range(self.index, len(order), self.rows_per_step)]
            for batch in self._load(mine):
                self.index += self.rows_per_step
                yield batch
            self.epoch, self.index = self.epoch + 1, 0

    def _load(self, batches: list[list[int]]) -> Iterator[dict[str, torch.Tensor]]:
        if self.num_workers == 0 or not batches:
            return (self.collate_fn([self.dataset[r] for r in rows]) for rows in batches)
        return iter(torch.utils.data.DataLoader(self.dataset, batch_sampler=batches, collate_fn=self.collate_fn,
                                                num_workers=self.num_workers))

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "num_rows": len(self.dataset)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["num_rows"] != len(self.dataset):
            raise ValueError(f"cannot resume the data loader: it was saved over {state['num_rows']} "
                             f"packed rows and the data now packs into {len(self.dataset)}; "
                             "the data, tokenizer or packing settings changed")
        if state["index"] % self.rows_per_step:
            raise ValueError(f"cannot resume the data loader at row {state['index']} of its epoch "
                             f"with {self.rows_per_step} rows per micro-batch "
                             f"(world_size {self.world_size} x micro_batch_size {self.micro_batch_size})")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
