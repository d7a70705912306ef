"""Dense CRF throughput, in one run on the same inputs: pydensecrf in a serial loop (one core) and in CRFPool, and
the torch backend (crf/lattice.py) in batches on the CPU and, when there is one, on CUDA.

    python benchmarks/crf_bench.py [--images 16] [--workers K] [--size 320] [--classes 27] [--batch 8]
                                   [--photos DIR]

Prints images per second for each, the ratios to the serial loop, whether the pool gives identical probabilities,
the torch backend's peak GPU memory, its rate with two maps per image refined together (the evaluation refines
the linear and the cluster probe's maps of a batch so), and how many pixels' labels the torch backend shares with
pydensecrf (exit status 1 if the pool differs or fewer than 99% agree). The pool's time includes starting its
worker processes; the torch backend's times follow one warm-up batch. Images are random noise by default (the
worst case for the lattice: every pixel's colour differs from its neighbours', so it has the most vertices), or the
photos of --photos resized to the size.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from crf.pool import CRFPool, resolve_workers  # noqa: E402
from crf.refiner import dense_crf  # noqa: E402
from crf.lattice import dense_crf_torch_shared  # noqa: E402
from utils.errors import ExitStatus  # noqa: E402

SEED = 0
IMAGE_SIZE = 320  # the evaluation resolution of the STEGO / PPAP configs
N_CLASSES = 27  # COCO-Stuff-27
N_IMAGES = 16
BATCH = 8  # images per call of the torch backend (the evaluation's batch)
MIN_AGREEMENT = 0.99  # of the labels of the torch backend and pydensecrf


def make_inputs(n_images: int, size: int, n_classes: int,
                photos: Optional[Path] = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Deterministic random images (or photos) and full-resolution scores (as the evaluation loop passes them)."""
    rng = np.random.default_rng(SEED)
    files = sorted(p for p in photos.iterdir() if p.is_file())[:n_images] if photos is not None else []
    images = [np.asarray(Image.open(f).convert("RGB").resize((size, size), Image.BILINEAR)) for f in files]
    images += [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n_images - len(images))]
    return [(image, rng.normal(size=(n_classes, size, size)).astype(np.float32)) for image in images]


def torch_backend(inputs: list[tuple[np.ndarray, np.ndarray]], batch: int, device: torch.device, maps: int = 1
                  ) -> tuple[float, list[np.ndarray], Optional[int]]:
    """Seconds for all images (after one warm-up batch), the probabilities of the first map, and on CUDA the peak
    of the memory allocated while a batch was refined (bytes; the inputs of all batches included), with the torch
    backend on device. With ``maps`` 2, each batch's scores are refined together with a second map (the scores'
    classes in reverse order), as the evaluation refines the linear and the cluster probe's maps. The timer covers
    the refinement of each batch, not the copy of its result to the host (the evaluation takes the labels on the
    device)."""
    batches = [inputs[i:i + batch] for i in range(0, len(inputs), batch)]
    as_tensors = [(torch.from_numpy(np.stack([im for im, _ in b])).to(device),
                   torch.from_numpy(np.stack([s for _, s in b])).to(device)) for b in batches]

    def refine(images: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return dense_crf_torch_shared(images, [scores, scores.flip(1)][:maps])[0]

    refine(*as_tensors[0])  # warm-up
    seconds, outputs, peak = 0.0, [], 0
    for images, scores in as_tensors:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        probs = refine(images, scores)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            peak = max(peak, torch.cuda.max_memory_allocated(device))
        seconds += time.perf_counter() - start
        outputs.append(probs.cpu())
        del probs
    return seconds, [p.numpy() for out in outputs for p in out], peak if device.type == "cuda" else None


def compare_torch_backend(inputs: list[tuple[np.ndarray, np.ndarray]], batch: int, serial: list[np.ndarray],
                          serial_s: float, results: dict) -> float:
    """Time the torch backend on the CPU and on CUDA (when there is one), with one map and with two, against
    pydensecrf's serial loop (``serial``: its probabilities, in ``serial_s`` seconds); print a line each and add the
    rates (and CUDA's peak memory) to ``results``. Returns the lowest share of labels that agree with pydensecrf's."""
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    agreement = 1.0
    for device in devices:
        for maps in (1, 2):
            seconds, probs, peak = torch_backend(inputs, batch, device, maps)
            rate = f"{len(inputs) / seconds:6.3f} images/s ({seconds:.1f} s, batches of {batch}"
            memory = f"; peak memory {peak / 2**20:.0f} MiB" if peak is not None else ""
            if maps == 2:
                print(f"{'  two maps':<18s}: {rate}, two maps per image refined together, as the evaluation does; "
                      f"{2 * serial_s / seconds:.2f}x the serial loop's time for two maps){memory}")
                results[f"torch_{device.type}_two_maps_images_per_s"] = len(inputs) / seconds
                if peak is not None:
                    results[f"torch_{device.type}_two_maps_peak_bytes"] = peak
                continue
            name = f"torch, {device.type}" + (f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else "")
            same = float(np.mean([(a.argmax(0) == b.argmax(0)).mean() for a, b in zip(probs, serial)]))
            agreement = min(agreement, same)
            print(f"{name:<18s}: {rate}; {serial_s / seconds:.2f}x the serial loop); labels as pydensecrf's: "
                  f"{100 * same:.2f}% of pixels, probabilities within "
                  f"{max(np.abs(a - b).max() for a, b in zip(probs, serial)):.1e}{memory}")
            results[f"torch_{device.type}_images_per_s"] = len(inputs) / seconds
            if peak is not None:
                results[f"torch_{device.type}_peak_bytes"] = peak
    return agreement


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=N_IMAGES)
    parser.add_argument("--workers", type=int, default=None, help="pool processes (default: usable cores)")
    parser.add_argument("--size", type=int, default=IMAGE_SIZE)
    parser.add_argument("--classes", type=int, default=N_CLASSES)
    parser.add_argument("--batch", type=int, default=BATCH, help="images per call of the torch backend")
    parser.add_argument("--photos", type=Path, default=None, help="a folder of photos to use instead of noise")
    parser.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    args = parser.parse_args()
    workers = resolve_workers(args.workers)
    if workers < 1:
        parser.error("--workers must be >= 1 to compare a pool with the serial loop")
    inputs = make_inputs(args.images, args.size, args.classes, args.photos)
    print(f"dense CRF, {args.images} {'photos' if args.photos else 'noise images'} of {args.size}x{args.size} px, "
          f"{args.classes} classes")

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
    results = {"serial_images_per_s": args.images / serial_s, "pool_images_per_s": args.images / pool_s,
               "workers": workers, "identical": identical}
    agreement = compare_torch_backend(inputs, args.batch, serial, serial_s, results)
    results["label_agreement"] = agreement
    if args.json:
        print(json.dumps(results))
    return ExitStatus.OK if identical and agreement >= MIN_AGREEMENT else ExitStatus.FAILED


if __name__ == "__main__":
    sys.exit(main())
