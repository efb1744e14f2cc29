"""The order and augmentation of training samples: reproducible across resumes and worker counts.

The data order of epoch ``e`` is a permutation drawn from ``(seed, e)`` and
each sample's augmentation is seeded by ``(seed, e, index)``, so a run resumed
mid-epoch sees exactly the batches and crops of an uninterrupted one, whatever
the number of loader workers.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def sample_seed(seed: int, epoch: int, index: int) -> int:
    # A fixed mix (not Python's salted hash) so workers and resumed runs agree.
    return (seed * 1_000_003 + epoch * 7_919 + index * 104_729) % (2**63 - 1)


class SeededSamples(Dataset):
    """Wraps a dataset so item ``(index, epoch)`` is augmented with its own seed.

    It reseeds the CPU generator of the process that loads the item (torchvision
    transforms draw from it). In loader workers that generator is the
    worker's own; in the main process :func:`batches_keeping_rng` restores it
    after each batch, which costs one state copy per batch instead of one per
    sample.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, epoch = key
        torch.random.default_generator.manual_seed(sample_seed(self.seed, epoch, index))
        return self.dataset[index]


def batches_keeping_rng(loader):
    """Iterate ``loader`` leaving the global CPU generator as if no batch had been loaded."""
    iterator = iter(loader)
    while True:
        state = torch.get_rng_state()
        try:
            batch = next(iterator)
        except StopIteration:
            return
        finally:
            torch.set_rng_state(state)
        yield batch


class EpochBatches(Sampler):
    """Batches of ``(index, epoch)`` keys for one epoch, starting at batch ``start``.

    The permutation depends only on (seed, epoch). Under data parallelism rank
    ``r`` of ``w`` takes rows ``[r*B/w, (r+1)*B/w)`` of every global batch, so
    the gathered batch is exactly the single-process batch.
    """

    def __init__(
        self, n: int, batch_size: int, seed: int, epoch: int, start: int = 0, rank: int = 0, world_size: int = 1
    ):
        self.n, self.batch_size, self.seed, self.epoch, self.start = n, batch_size, seed, epoch, start
        self.rank, self.world_size = rank, world_size
        self.local = batch_size // world_size

    def __len__(self):
        return self.n // self.batch_size - self.start

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=gen).tolist()
        for b in range(self.start, self.n // self.batch_size):
            rows = order[b * self.batch_size : (b + 1) * self.batch_size]
            rows = rows[self.rank * self.local : (self.rank + 1) * self.local]
            yield [(i, self.epoch) for i in rows]


def train_loader(run, items: Dataset, collate, epoch: int, start: int = 0) -> DataLoader:
    """The training DataLoader of ``epoch`` from batch ``start``; its ``batch_sampler`` is an :class:`EpochBatches`.

    ``items`` is the :class:`SeededSamples` view of the training set. Shared by
    the training loop and the throughput benchmarks, so both load alike.
    """
    config = run.config
    sampler = EpochBatches(
        len(run.train_set), config.batch_size, config.seed, epoch, start=start, rank=run.rank, world_size=run.world_size
    )
    return DataLoader(
        items,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=config.num_workers,
        pin_memory=run.device.type == "cuda",
        # its own generator, so creating a loader leaves the global RNG untouched
        generator=torch.Generator().manual_seed(config.seed + epoch),
    )
