"""Data loaders for training and evaluation, and the epoch sampler that makes training order reproducible."""
from __future__ import annotations

import functools
import os
import random
from typing import Any, Iterable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from config import DataloaderConfig
from utils.signals import worker_process_setup


class EpochSampler(Sampler[tuple[int, int]]):
    """A fresh permutation per epoch, from (seed, epoch) alone, that can start at any batch of the epoch, split
    into the parts of the data-parallel processes.

    This is what makes resume exact and the processes' number irrelevant: the data order of an epoch depends on
    nothing else. ``batch_size`` is the global batch; process ``rank`` of ``world_size`` takes images
    ``[rank * b, (rank + 1) * b)`` of every global batch (``b = batch_size / world_size``), so the global batch,
    the processes' parts put together in rank order, is what one process would take. Only whole batches are
    yielded (the last incomplete one is dropped). Each item is ``(index, sample_seed)``: ``SeededSamples`` draws
    the random transform of the image (a random crop) from its seed, which is fixed by the image's position in
    the epoch, so the crops do not depend on the data-loader workers or the processes either.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} is not a multiple of {world_size} processes")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.local_batch_size = rank, batch_size // world_size
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def batches_per_epoch(self) -> int:
        return self.n // self.batch_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
        order = torch.randperm(self.n, generator=generator)
        sample_seeds = torch.randint(2**62, (self.n,), generator=generator)  # by position in the epoch
        first = self.rank * self.local_batch_size
        positions = torch.arange(self.start_batch, self.batches_per_epoch())[:, None] * self.batch_size + \
            torch.arange(first, first + self.local_batch_size)
        positions = positions.reshape(-1)
        return iter(zip(order[positions].tolist(), sample_seeds[positions].tolist()))

    def __len__(self) -> int:
        return (self.batches_per_epoch() - self.start_batch) * self.local_batch_size


class SeededSamples(Dataset):
    """``dataset[index]`` with torch's CPU random stream seeded by ``sample_seed`` for the call (and restored after
    it): the items of an ``EpochSampler``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, sample_seed = key
        with torch.random.fork_rng(devices=[]):  # the CPU stream only; a CUDA stream is never touched here
            torch.default_generator.manual_seed(sample_seed)
            return self.dataset[index]


def _epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch  # distinct streams per (seed, epoch)


def _init_worker(worker_id: int, parent: int) -> None:
    """Seed numpy and python in a data-loader worker from its torch seed (torch seeds itself per worker); leave
    Ctrl-C to the main process, which stops the workers, and end when it is gone."""
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)
    worker_process_setup(parent)


def make_loader(dataset: Dataset, cfg: DataloaderConfig, seed: int, device: torch.device,
                batch_size: Optional[int] = None, sampler: Optional[Iterable] = None) -> DataLoader:
    """A seeded loader in ``sampler``'s order (default: the dataset's order; a ``range`` takes a process's
    share of it), pinned on CUDA, with persistent workers; ``batch_size`` defaults to ``cfg.batch_size``.
    With an ``EpochSampler``, pass ``SeededSamples(dataset)`` and the sampler's ``local_batch_size``."""
    workers = cfg.num_workers
    return DataLoader(dataset, batch_size=batch_size or cfg.batch_size, sampler=sampler, shuffle=False,
                      num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                      worker_init_fn=functools.partial(_init_worker, parent=os.getpid()), generator=torch.Generator().manual_seed(seed))
