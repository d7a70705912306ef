"""A small synthetic labelled set for trying the pipeline without downloading anything.

Scenes have a sky above a wavy horizon, two ground regions (grass, road or water) split by a wavy line,
and a few buildings, balls and boxes. Each class has its own colour and texture (gradient, noise, ripples,
bricks, shading, checkerboard), so an unsupervised method can separate them. Images are written in the
``directory`` layout (imgs/{train,val}/NAME.jpg, labels/{train,val}/NAME.png); every pixel is labelled.
Generation is deterministic: image ``i`` of a split depends only on (seed, split, i).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image

from utils.errors import DataError
from utils.files import FolderLock

log = logging.getLogger(__name__)

DEMO_CLASS_NAMES = ("sky", "grass", "road", "water", "building", "ball", "box")
SKY, GRASS, ROAD, WATER, BUILDING, BALL, BOX = range(len(DEMO_CLASS_NAMES))
DEMO_COLORS = (  # base colour of each class, textures vary around it; also the display colours
    (120, 160, 225), (60, 140, 45), (115, 115, 115), (30, 85, 160), (165, 75, 55), (235, 195, 40), (130, 50, 150),
)
# Texture parameters (ours), in 8-bit intensity steps or pixels.
SKY_GRADIENT = np.array([-80, -70, -20], np.float32)  # top of the sky = colour + this, horizon = colour - this
GRASS_NOISE = np.array([12, 30, 10], np.float32)  # per-channel noise amplitude of grass
ROAD_NOISE = 8.0  # grey noise amplitude of asphalt (half of it on bricks)
RIPPLE_PERIOD, RIPPLE_AMPLITUDE = 6.0, 20.0  # water ripples: rows per wave, intensity swing
BRICK_HEIGHT = 10  # rows per brick course; bricks are twice as wide
MORTAR_GREY = np.float32(200)
CHECKER_SIDE, CHECKER_CONTRAST = 8, np.array([30, 20, 30], np.float32)  # box checkerboard
DEMO_SPLITS = {"train": 200, "val": 50}  # images per split
DEMO_MIN_SIDE, DEMO_MAX_SIDE = 224, 320  # image height and width are drawn from this range, in pixels
DEMO_JPEG_QUALITY = 95  # ours: high enough that class textures survive compression
DEMO_INFO = "demo_info.json"  # written last into a generated set; names its seed and counts
DEMO_VERSION = 1  # bump when the generator's output changes
_SPLIT_KEYS = {"train": 0, "val": 1}  # part of each image's random seed


def ensure_demo_data(data_path: Union[str, Path], seed: int = 0, splits: dict[str, int] = DEMO_SPLITS) -> Path:
    """Generate the demo set into ``data_path`` unless it is already there; return ``data_path``.

    The set is written to a temporary sibling folder and renamed at the end, so an interrupted run never
    leaves a partial set behind. Runs that start together wait for each other (a lock beside the folder): one
    generates, the others find the set. An existing folder must hold a demo set of the same seed and size.
    """
    path = Path(data_path)
    if path.exists() and not path.is_dir():
        raise DataError(f"demo data_path {path} is a file; point dataset.data_path at a folder")
    if not _is_empty(path):
        _check_existing(path, seed, splits)
        return path
    with FolderLock(path.parent / f".{path.name}.lock"):
        if not _is_empty(path):  # another run generated it while we waited
            _check_existing(path, seed, splits)
            return path
        for stale in path.parent.glob(f".{path.name}.partial-*"):  # left by a killed generation
            shutil.rmtree(stale, ignore_errors=True)
        partial = path.parent / f".{path.name}.partial-{os.getpid()}"
        try:
            generate_demo_data(partial, seed, splits)
            os.replace(partial, path)  # atomic; also replaces an empty folder at path
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    log.info("generated the demo set (%s) in %s", ", ".join(f"{n} {s}" for s, n in splits.items()), path)
    return path


def _is_empty(path: Path) -> bool:
    return not path.is_dir() or not any(path.iterdir())


def generate_demo_data(out_dir: Union[str, Path], seed: int = 0, splits: dict[str, int] = DEMO_SPLITS) -> None:
    """Write the demo set into ``out_dir`` (created), ``demo_info.json`` last."""
    out = Path(out_dir)
    for split, count in splits.items():
        image_dir, label_dir = out / "imgs" / split, out / "labels" / split
        image_dir.mkdir(parents=True)
        label_dir.mkdir(parents=True)
        for index in range(count):
            image, label = demo_scene(seed, split, index)
            Image.fromarray(image).save(image_dir / f"{index:04d}.jpg", quality=DEMO_JPEG_QUALITY)
            Image.fromarray(label).save(label_dir / f"{index:04d}.png")
    (out / DEMO_INFO).write_text(json.dumps(_info(seed, splits), indent=1))


def demo_scene(seed: int, split: str, index: int) -> tuple[np.ndarray, np.ndarray]:
    """One scene: an RGB uint8 image H x W x 3 and its class ids uint8 H x W."""
    rng = np.random.default_rng([seed, _SPLIT_KEYS[split], index])
    h, w = (int(v) for v in rng.integers(DEMO_MIN_SIDE, DEMO_MAX_SIDE + 1, size=2))
    y = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None]
    x = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :]
    label, shade, horizon = _layout(rng, y, x, h, w)
    image = np.zeros((h, w, 3), dtype=np.float32)
    for cls in np.unique(label):
        np.copyto(image, _texture(int(cls), rng, y, x, h, w, horizon, shade), where=(label == cls)[..., None])
    image *= rng.uniform(0.85, 1.15)  # global illumination
    image += 3 * rng.standard_normal(image.shape, dtype=np.float32)  # sensor noise
    return np.clip(image, 0, 255).astype(np.uint8), label


def _layout(rng: np.random.Generator, y: np.ndarray, x: np.ndarray, h: int, w: int):
    """Class map, ball shading and the horizon height of one scene."""
    level = rng.uniform(0.3, 0.6)
    horizon = level + rng.uniform(0.02, 0.06) * np.sin(2 * np.pi * (rng.uniform(0.5, 2.0) * x + rng.uniform()))
    ground = rng.choice([GRASS, ROAD, WATER], size=2, replace=False)
    boundary = rng.uniform(0.25, 0.75) + 0.08 * np.sin(2 * np.pi * (1.5 * y + rng.uniform()))
    label = np.where(y < horizon, SKY, np.where(x < boundary, ground[0], ground[1])).astype(np.uint8)
    for _ in range(rng.integers(0, 3)):
        left, width, top = rng.uniform(0.0, 0.8), rng.uniform(0.1, 0.3), rng.uniform(0.05, level - 0.1)
        label[(x >= left) & (x < left + width) & (y >= top) & (y < level + 0.05)] = BUILDING
    shade = np.ones((h, w), dtype=np.float32)
    for _ in range(rng.integers(1, 4)):
        cy, cx = rng.uniform(level + 0.05, 0.95), rng.uniform(0.05, 0.95)
        radius = rng.uniform(0.05, 0.12) * min(h, w)
        dist = np.sqrt(((x - cx) * w) ** 2 + ((y - cy) * h) ** 2) / radius
        inside = dist < 1
        label[inside] = BALL
        shade[inside] = 1.0 - 0.45 * dist[inside] ** 2
    for _ in range(rng.integers(0, 3)):
        cy, cx, half = rng.uniform(0.2, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.12)
        dy, dx = np.abs(y - cy), np.abs(x - cx) * w / h
        box = (dy < half) & (dx < half) if rng.uniform() < 0.5 else (dy < half) & (dx < (y - cy + half) / 2)
        label[box] = BOX
    return label, shade, level


def _texture(cls: int, rng: np.random.Generator, y: np.ndarray, x: np.ndarray, h: int, w: int,
             horizon: float, shade: np.ndarray) -> np.ndarray:
    """The full-size H x W x 3 float appearance of one class, around its DEMO_COLORS colour."""
    base = np.array(DEMO_COLORS[cls], np.float32)
    rows, cols = np.arange(h)[:, None], np.arange(w)[None, :]
    if cls == SKY:  # vertical gradient, deep blue at the top to pale at the horizon
        t = np.clip(y / horizon, 0, 1)[..., None]
        return np.broadcast_to(base + (1 - 2 * t) * SKY_GRADIENT, (h, w, 3))
    if cls == GRASS:  # strong per-pixel noise, mostly in green
        return base + _noise(rng, h, w) * GRASS_NOISE
    if cls == ROAD:  # flat grey asphalt with fine noise
        return np.broadcast_to(base + ROAD_NOISE * _noise(rng, h, w), (h, w, 3))
    if cls == WATER:  # horizontal ripples with a slight sideways wave
        phase = 2 * np.pi * (rows / RIPPLE_PERIOD + 0.5 * np.sin(2 * np.pi * 3 * x))
        return base + (RIPPLE_AMPLITUDE * np.sin(phase))[..., None] * np.array([0.5, 1, 1], np.float32)
    if cls == BUILDING:  # bricks in staggered courses with pale mortar lines
        course = rows // BRICK_HEIGHT
        mortar = (rows % BRICK_HEIGHT == 0) | ((cols + BRICK_HEIGHT * (course % 2)) % (2 * BRICK_HEIGHT) == 0)
        return np.where(mortar[..., None], MORTAR_GREY, base) + ROAD_NOISE / 2 * _noise(rng, h, w)
    if cls == BALL:  # disks shaded towards the rim
        return base * shade[..., None]
    if cls == BOX:  # checkerboard of a light and a dark shade
        check = ((rows // CHECKER_SIDE + cols // CHECKER_SIDE) % 2).astype(np.float32)[..., None]
        return base + (2 * check - 1) * CHECKER_CONTRAST
    raise ValueError(f"no texture for class {cls}")


def _noise(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Per-pixel standard normal noise, H x W x 1 (the same in every channel)."""
    return rng.standard_normal((h, w, 1), dtype=np.float32)


def _info(seed: int, splits: dict[str, int]) -> dict:
    return {"generator": "dataset/demo.py", "version": DEMO_VERSION, "seed": seed, "splits": dict(splits),
            "classes": list(DEMO_CLASS_NAMES)}


def _check_existing(path: Path, seed: int, splits: dict[str, int]) -> None:
    info_file = path / DEMO_INFO
    if not info_file.is_file():
        raise DataError(f"{path} exists but holds no demo set (no {DEMO_INFO}); point dataset.data_path "
                        f"at an absent or empty folder and the demo set is generated there")
    found = json.loads(info_file.read_text())
    expected = _info(seed, splits)
    if found != expected:
        shown = {k: found.get(k) for k in ("version", "seed", "splits")}
        wanted = {k: expected[k] for k in ("version", "seed", "splits")}
        raise DataError(f"{path} holds a demo set made with {shown}, not {wanted}; delete it or use another data_path")
