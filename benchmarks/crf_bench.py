"""Dense CRF throughput: the serial loop against CRFPool, on the same inputs, in one run.

    python benchmarks/crf_bench.py [--images 16] [--workers K] [--size 320] [--classes 27]

Prints images per second for both, their ratio, and whether the two give identical probabilities (exit status 1
if not). The pool's time includes starting its worker processes. With k usable cores the pool should approach
k times the serial rate.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from utils.crf import CRFPool, dense_crf, resolve_workers  # noqa: E402

SEED = 0
IMAGE_SIZE = 320  # the evaluation resolution of the STEGO / PPAP configs
N_CLASSES = 27  # COCO-Stuff-27
N_IMAGES = 16


def make_inputs(n_images: int, size: int, n_classes: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Deterministic random images and full-resolution scores (as the evaluation loop passes them)."""
    rng = np.random.default_rng(SEED)
    return [(rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
             rng.normal(size=(n_classes, size, size)).astype(np.float32)) for _ in range(n_images)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=N_IMAGES)
    parser.add_argument("--workers", type=int, default=None, help="pool processes (default: usable cores)")
    parser.add_argument("--size", type=int, default=IMAGE_SIZE)
    parser.add_argument("--classes", type=int, default=N_CLASSES)
    parser.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    args = parser.parse_args()
    workers = resolve_workers(args.workers)
    if workers < 1:
        parser.error("--workers must be >= 1 to compare a pool with the serial loop")
    inputs = make_inputs(args.images, args.size, args.classes)
    print(f"dense CRF, {args.images} images of {args.size}x{args.size} px, {args.classes} classes")

    start = time.perf_counter()
    serial = [dense_crf(image, scores) for image, scores in inputs]
    serial_s = time.perf_counter() - start
    print(f"serial            : {args.images / serial_s:6.3f} images/s ({serial_s:.1f} s)")

    start = time.perf_counter()
    with CRFPool(workers, output="probs") as pool:
        for index, (image, scores) in enumerate(inputs):
            pool.submit(index, image, scores)
        pooled = [probs for _, probs in pool.results()]
    pool_s = time.perf_counter() - start
    print(f"pool, {workers:2d} workers  : {args.images / pool_s:6.3f} images/s ({pool_s:.1f} s, start of the workers "
          "included)")
    print(f"speed-up          : {serial_s / pool_s:.2f}x (ideal {workers}x)")

    identical = all(np.array_equal(a, b) for a, b in zip(serial, pooled))
    print(f"identical results : {'yes' if identical else 'NO'}")
    if args.json:
        print(json.dumps({"serial_images_per_s": args.images / serial_s, "pool_images_per_s": args.images / pool_s,
                          "workers": workers, "identical": identical}))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
