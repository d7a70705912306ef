"""The one way into the dense CRF: ``dense_crf`` for one image, ``Refiner`` for the batches of an evaluation or of
predict.py. This is the only file that knows the backends by name (``eval.crf_backend``):

- "pydensecrf": the protocol's C++ CRF (crf/pydensecrf_backend.py) in a pool of worker processes (crf/pool.py),
  which refine earlier images while the caller runs the network on the next batch;
- "torch": the same CRF in PyTorch (crf/lattice.py), refining each batch when it is submitted, on the device that
  holds its images, all score maps of an image through one mean field.

Both give the same labels up to float rounding (crf/lattice.py says how close).
"""
from __future__ import annotations

from collections import deque
from typing import Hashable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from crf.lattice import dense_crf_torch, dense_crf_torch_shared
from crf.parameters import BACKENDS
from crf.pool import OUTPUTS, CRFPool
from crf.pydensecrf_backend import check_inputs, refine

POOLED = "pydensecrf"  # refined in worker processes, beside the network


def dense_crf(image: np.ndarray, scores: np.ndarray, backend: str = "pydensecrf",
              device: Optional[str] = None) -> np.ndarray:
    """Refine CxhxW class scores (logits or log-probabilities) on an HxWx3 uint8 RGB image.

    Returns the CRF's CxHxW float32 class probabilities at the image's resolution. ``backend``: "pydensecrf" (the
    paper's protocol) or "torch" (the same CRF in PyTorch, on ``device``, default the CPU).
    """
    check_inputs(image, scores)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} (got {backend!r})")
    if backend == POOLED:
        return refine(image, scores)
    probs = dense_crf_torch(torch.tensor(image, device=device or "cpu")[None],
                            torch.tensor(scores, device=device or "cpu")[None])
    return probs[0].cpu().numpy()


def overlaps_network(backend: str) -> bool:
    """Whether ``backend`` refines beside the network (its time in an evaluation is spent handing images over and
    waiting for them) rather than in turn with it."""
    return backend == POOLED


Refined = tuple[Hashable, list[Tensor]]  # an image's key, and the H x W labels (or C x H x W probabilities) of each map


class Refiner:
    """Dense CRF on batches: ``submit`` a batch, take the labels of finished images with ``ready`` (without waiting)
    and, at the end, ``results`` (waiting); both in submission order. A context manager: leaving the block by an
    exception (Ctrl-C included) stops the pool's workers at once.

    ``backend``: a name of ``BACKENDS``; ``workers``: the pool's processes (``eval.crf_workers``: None = the usable
    cores, 0 = serial in this process); ``output``: "labels" (H x W, the most probable class) or "probs" (the CRF's
    C x H x W float32 class probabilities).
    """

    def __init__(self, backend: str, workers: Optional[int] = None, output: str = "labels") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} (got {backend!r})")
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS} (got {output!r})")
        self.backend, self.output = backend, output
        self.overlaps_network = overlaps_network(backend)
        self._pool = CRFPool(workers, output=output) if self.overlaps_network else None
        self._done: deque[Refined] = deque()  # refined on the device, not yet taken
        self._maps: deque[tuple[Hashable, int, torch.device]] = deque()  # in the pool: key, its maps, its device
        self._parts: list[Tensor] = []  # labels of the front image's maps that are back from the pool

    def __enter__(self) -> Refiner:
        return self

    def __exit__(self, exc_type: object, exc: object, traceback: object) -> None:
        if self._pool is not None:
            self._pool.__exit__(exc_type, exc, traceback)

    def submit(self, keys: Sequence[Hashable], images: Tensor, maps: Sequence[Tensor]) -> None:
        """Refine ``images`` (B x H x W x 3 uint8 RGB) with each of ``maps`` (B x C x h x w log-probabilities, or
        logits), one key per image. The pool copies them to the host; the device backend refines them now."""
        if self._pool is None:
            labels = [probs.argmax(1) if self.output == "labels" else probs
                      for probs in dense_crf_torch_shared(images, list(maps))]
            self._done.extend((key, [each[j] for each in labels]) for j, key in enumerate(keys))
            return
        host_images, host_maps = images.cpu().numpy(), [m.cpu().numpy() for m in maps]
        for j, key in enumerate(keys):
            self._maps.append((key, len(host_maps), images.device))
            for m, scores in enumerate(host_maps):
                self._pool.submit((key, m), host_images[j], scores[j])

    def ready(self) -> Iterator[Refined]:
        """The images refined so far that were not taken yet, without waiting."""
        yield from self._take(self._pool.ready() if self._pool is not None else iter(()))

    def results(self) -> Iterator[Refined]:
        """Every image not taken yet, waiting for each."""
        yield from self._take(self._pool.results() if self._pool is not None else iter(()))

    def _take(self, pooled: Iterator[tuple[Hashable, np.ndarray]]) -> Iterator[Refined]:
        while self._done:
            yield self._done.popleft()
        for _, labels in pooled:
            key, n_maps, device = self._maps[0]
            self._parts.append(torch.from_numpy(labels).to(device))
            if len(self._parts) == n_maps:
                self._maps.popleft()
                parts, self._parts = self._parts, []
                yield key, parts
