"""Data loaders for training and evaluation, and the epoch sampler that makes training order reproducible."""
from __future__ import annotations

import functools
import os
import random
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from utils.config import DataloaderConfig
from utils.signals import worker_process_setup


class EpochSampler(Sampler[int]):
    """A fresh permutation per epoch, from (seed, epoch) alone, that can start at any batch of the epoch.

    This is what makes resume exact: the data order of an epoch does not depend on how the run got there. Only
    whole batches are yielded (the last incomplete one is dropped), so every iteration sees ``batch_size`` images.
    """

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def batches_per_epoch(self) -> int:
        return self.n // self.batch_size

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch)))
        start, stop = self.start_batch * self.batch_size, self.batches_per_epoch() * self.batch_size
        return iter(order[start:stop].tolist())

    def __len__(self) -> int:
        return (self.batches_per_epoch() - self.start_batch) * self.batch_size


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
                batch_size: Optional[int] = None, sampler: Optional[Sampler] = None) -> DataLoader:
    """A seeded loader in ``sampler``'s order (default: the dataset's order), pinned on CUDA, with persistent
    workers; ``batch_size`` defaults to ``cfg.batch_size``."""
    workers = cfg.num_workers
    return DataLoader(dataset, batch_size=batch_size or cfg.batch_size, sampler=sampler, shuffle=False,
                      num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                      worker_init_fn=functools.partial(_init_worker, parent=os.getpid()), generator=torch.Generator().manual_seed(seed))
