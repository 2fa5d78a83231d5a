"""How processes read a split: whole batches in turn (``WholeBatchSampler``), so that every process sees the batches a
one-process run sees; and DataLoader workers that leave SIGTERM to the main process."""

from __future__ import annotations

import math
import signal

from torch.utils.data import Dataset, DistributedSampler


def leave_sigterm_to_the_main_process(worker: int) -> None:
    """A DataLoader worker ignores SIGTERM: a scheduler signals the whole process group, and the main process stops
    the run at the next batch (Lightning), saying how to resume, then ends its workers itself."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class WholeBatchSampler(DistributedSampler):
    """Deals whole batches to processes: rank r reads batches r, r + N, r + 2N, … of the one-process order.

    Every batch is then the batch a one-process run sees (T³_B averages λ over the same samples, forwards see
    the same inputs), and no sample is repeated or dropped. A process may get no batch of a small split.
    A ``DistributedSampler`` so that Lightning does not replace it with its padding one.
    """

    def __init__(self, dataset: Dataset, batch_size: int, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        size = len(dataset)
        batches = range(rank, math.ceil(size / batch_size), num_replicas)
        self.indices = [i for b in batches for i in range(b * batch_size, min((b + 1) * batch_size, size))]
        self.num_samples = len(self.indices)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
