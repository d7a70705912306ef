"""Segment images that have no labels: a trained model's class (or cluster) map of every input image, as a palette PNG
that reads back as ids, and an overlay of the image with its colours and a legend of the classes present.

Each image is read as RGB (``dataset.base.read_image``: any mode PIL opens), resized as evaluation sizes images (the
shorter side to 320 px) with each side then brought to a multiple of the patch size by the same resize (never a
one-sided crop or pad, so that mirroring an image commutes with its preprocessing; bilinear with antialiasing),
segmented (``engine.evaluate.segment_code``, with flip TTA on request), optionally refined by the dense CRF of
evaluation, and the label map is brought back to the image's own size (nearest). Memory: the network's input is at
most ``MAX_SIDE`` pixels on its longer side; full-size work (decoding, the label map, the overlay) is 8- and 16-bit;
PIL refuses images beyond its decompression-bomb limit (about 179 million pixels), which are named and skipped.
"""
from __future__ import annotations

import contextlib
import glob
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor, nn
from tqdm import tqdm

from dataset.base import read_image
from dataset.transforms import EVAL_RES
from engine.evaluate import CRF_CLUSTER_ALPHA, segment_code
from utils.crf import CRFPool
from utils.device import autocast
from utils.errors import DataError, UserError
from utils.files import atomic_output
from utils.image import IMAGENET_MEAN, IMAGENET_STD, denormalize_batch, denormalize_to_uint8
from utils.lattice import dense_crf_torch
from utils import signals

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp")
MAX_SIDE = 2048  # the longest side fed to the network; longer images are scaled down to it
OVERLAY_QUALITY = 90
LEGEND_SWATCH = 14  # pixels
UNMATCHED_COLOR = (128, 128, 128)


@dataclass(frozen=True)
class Input:
    path: Path
    name: Path  # the output name without suffix, relative to the output folder


def collect_inputs(arguments: Sequence[str]) -> list[Input]:
    """Image files, folders (recursively) and glob patterns -> inputs with their output names: the path relative to
    the folder argument (a file or a pattern's match: its name alone), the extension kept in the name where two
    inputs would otherwise share one."""
    found: list[tuple[Path, Path]] = []
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            found += [(p, p.relative_to(path)) for p in files]
        elif path.is_file():
            found.append((path, Path(path.name)))
        elif glob.has_magic(argument):
            matches = sorted(Path(p) for p in glob.glob(argument, recursive=True) if Path(p).is_file())
            if not matches:
                raise UserError(f"{argument}: no file matches this pattern")
            found += [(p, Path(p.name)) for p in matches]
        else:
            raise UserError(f"{argument}: no such file or folder")
    if not found:
        raise UserError(f"no images found in {', '.join(arguments)} (looked for {', '.join(IMAGE_SUFFIXES)})")
    stems: dict[Path, int] = {}
    for _, rel in found:
        stems[rel.with_suffix("")] = stems.get(rel.with_suffix(""), 0) + 1
    return [Input(p, rel.with_suffix("") if stems[rel.with_suffix("")] == 1 else rel) for p, rel in found]


def network_size(height: int, width: int, patch: int) -> tuple[int, int]:
    """The shorter side to 320 px, the longer at most ``MAX_SIDE``, then each side to the nearest multiple of the
    patch size."""
    scale = min(EVAL_RES / min(height, width), MAX_SIDE / max(height, width))
    return tuple(max(patch, round(side * scale / patch) * patch) for side in (height, width))


def prepare(image: Image.Image, patch: int) -> Tensor:
    """The normalised 3 x H x W tensor the network sees."""
    size = network_size(image.height, image.width, patch)
    tensor = TF.resize(TF.to_tensor(image), list(size), interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    return TF.normalize(tensor, IMAGENET_MEAN, IMAGENET_STD)


@dataclass
class Labels:
    """What the written maps hold: names and colours of the ids, and how the probe's outputs map to them."""

    names: list[str]
    colors: np.ndarray  # len(names) x 3 uint8
    to_id: Optional[np.ndarray]  # probe output -> id in names (None: the identity)


def label_set(probe: str, class_names: list[str], colors: np.ndarray, n_clusters: int,
              matching: Optional[list[int]]) -> Labels:
    """Class names and colours for the linear probe and for matched clusters; "cluster k" in distinct colours for
    clusters without a matching, and for clusters the matching leaves without a class."""
    if probe == "linear":
        return Labels(list(class_names), colors, None)
    if matching is None:
        cmap = matplotlib.colormaps["tab20" if n_clusters <= 20 else "hsv"]
        palette = (np.array([cmap(k / max(n_clusters, 1))[:3] for k in range(n_clusters)]) * 255).astype(np.uint8)
        return Labels([f"cluster {k}" for k in range(n_clusters)], palette, None)
    names, palette, to_id = list(class_names), [tuple(c) for c in colors], np.zeros(n_clusters, np.int64)
    for cluster, cls in enumerate(matching):
        if cls >= 0:
            to_id[cluster] = cls
        else:
            to_id[cluster] = len(names)
            names.append(f"cluster {cluster}")
            palette.append(UNMATCHED_COLOR)
    return Labels(names, np.array(palette, np.uint8), to_id)


def read_matching(path: Path, crf: bool, n_clusters: int, class_names: list[str]) -> list[int]:
    """The cluster -> class list that eval.py stored in ``path`` (after CRF for ``crf``)."""
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        matching = report["matching"]
        mapping = matching["crf" if crf and "crf" in matching else "no_crf"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path}: not an eval_report.json with a cluster matching ({type(err).__name__}: {err}); "
                        f"run eval.py on the checkpoint first, or predict with --probe linear") from None
    if len(mapping) != n_clusters or matching.get("classes") != class_names:
        raise UserError(f"{path}: its matching is for {len(mapping)} clusters and the classes "
                        f"{matching.get('classes')}; the model has {n_clusters} clusters and the classes {class_names}")
    return [int(c) for c in mapping]


def default_report(checkpoint: Path) -> Optional[Path]:
    """eval.py's report beside the checkpoint: ``{stem}_eval_report.json`` (run.py's final evaluation) or
    ``eval_report.json`` (eval.py)."""
    for name in (f"{checkpoint.stem}_eval_report.json", "eval_report.json"):
        if (checkpoint.parent / name).is_file():
            return checkpoint.parent / name
    return None


def save_label_map(path: Path, ids: np.ndarray, labels: Labels) -> None:
    """A palette PNG: pixel values are the ids, the palette their colours (so any viewer shows the colours)."""
    image = Image.fromarray(ids.astype(np.uint8), mode="P")
    palette = np.zeros((256, 3), np.uint8)
    palette[:len(labels.colors)] = labels.colors
    image.putpalette(palette.flatten().tolist())
    with atomic_output(path) as tmp:
        image.save(tmp, format="PNG")


def save_overlay(path: Path, image: Image.Image, ids: np.ndarray, labels: Labels) -> None:
    """The image blended with the class colours, with a legend of the classes present."""
    colored = labels.colors[np.clip(ids, 0, len(labels.colors) - 1)]
    blend = ((np.asarray(image, np.uint16) + colored) // 2).astype(np.uint8)  # half and half, in 16-bit integers
    overlay = Image.fromarray(blend)
    draw = ImageDraw.Draw(overlay)
    font = ImageFont.load_default()
    present = [int(i) for i in np.unique(ids)]
    line = LEGEND_SWATCH + 4
    width = max(draw.textlength(labels.names[i], font=font) for i in present) + LEGEND_SWATCH + 12
    draw.rectangle((0, 0, width, line * len(present) + 4), fill=(255, 255, 255))
    for row, i in enumerate(present):
        top = 4 + row * line
        draw.rectangle((4, top, 4 + LEGEND_SWATCH, top + LEGEND_SWATCH), fill=tuple(int(c) for c in labels.colors[i]),
                       outline=(0, 0, 0))
        draw.text((8 + LEGEND_SWATCH, top + 1), labels.names[i], fill=(0, 0, 0), font=font)
    with atomic_output(path) as tmp:
        overlay.save(tmp, format="JPEG", quality=OVERLAY_QUALITY)


@dataclass
class Prediction:
    name: Path
    image: Image.Image  # as read, for the size and the overlay
    scores: np.ndarray  # C x H x W log-probabilities at the network's input size


@dataclass
class Summary:
    written: int = 0
    failed: list[tuple[Path, str]] = field(default_factory=list)  # (input, why)

    def line(self) -> str:
        text = f"{self.written} image{'s' * (self.written != 1)} written"
        if self.failed:
            text += f", {len(self.failed)} failed: " + "; ".join(f"{p} ({why})" for p, why in self.failed)
        return text


def predict(net: nn.Module, linear: nn.Module, cluster: nn.Module, inputs: Sequence[Input], out_dir: Path,
            labels: Labels, probe: str, device: torch.device, precision: str, tta: bool = False,
            crf: bool = False, crf_workers: Optional[int] = None, save_scores: bool = False,
            batch_size: int = 8, crf_backend: str = "pydensecrf") -> Summary:
    """Segment ``inputs`` into ``out_dir``: ``NAME.png`` and ``NAME_overlay.jpg`` (and ``NAME_scores.npz``) each.

    Consecutive images that the network sees at the same size (the frames of a video, a camera's photos) go through
    it in batches of up to ``batch_size``; with ``crf`` the CRF pool refines earlier images meanwhile, or, with
    ``crf_backend`` "torch", each batch is refined on the device."""
    for m in (net, linear, cluster):
        m.eval()
    summary = Summary()
    on_device = crf and crf_backend == "torch"
    pool = CRFPool(crf_workers, output="labels") if crf and not on_device else contextlib.nullcontext()
    waiting: dict[Path, Prediction] = {}  # images in the CRF pool

    def run(batch: list[tuple[Input, Image.Image, Tensor]]) -> None:
        img = torch.stack([tensor for _, _, tensor in batch]).to(device)
        with autocast(device, precision):
            code = F.interpolate(segment_code(net, img, tta), img.shape[-2:], mode="bilinear", align_corners=False)
            scores = linear(code) if probe == "linear" else CRF_CLUSTER_ALPHA * cluster(code).inner
        log_probs = F.log_softmax(scores.float(), dim=1)
        refined = dense_crf_torch(denormalize_batch(img), log_probs).argmax(1).cpu().numpy() if on_device else None
        log_probs = log_probs.cpu().numpy()
        for j, (item, image, _) in enumerate(batch):
            done = Prediction(item.name, image, log_probs[j])
            if on_device:
                _write(done, refined[j], out_dir, labels, save_scores, summary)
            elif crf:
                waiting[item.name] = done
                pool.submit(item.name, denormalize_to_uint8(img[j]), log_probs[j])
            else:
                _write(done, log_probs[j].argmax(0), out_dir, labels, save_scores, summary)
        if crf and not on_device:
            for key, crf_labels in pool.ready():
                _write(waiting.pop(key), crf_labels, out_dir, labels, save_scores, summary)

    with pool, torch.inference_mode():
        batch: list[tuple[Input, Image.Image, Tensor]] = []
        for item in tqdm(inputs, desc="predict", unit="image", disable=None):
            signals.check()
            try:
                image = read_image(item.path)
            except DataError as err:
                summary.failed.append((item.path, _reason(err)))
                log.warning("skipped %s", err)
                continue
            tensor = prepare(image, net.patch_size)
            if batch and (tensor.shape != batch[0][2].shape or len(batch) == batch_size):
                run(batch)
                batch = []
            batch.append((item, image, tensor))
        if batch:
            run(batch)
        if crf and not on_device:
            for key, crf_labels in pool.results():
                _write(waiting.pop(key), crf_labels, out_dir, labels, save_scores, summary)
    return summary


def _reason(err: DataError) -> str:
    """The reason of a read error without its path (the summary names the file): "truncated JPEG"-like."""
    text = str(err).split(": ", 1)[-1]
    return text.removeprefix("cannot read the image (").removesuffix("); the file is corrupt or not an image")


def _write(done: Prediction, outputs: np.ndarray, out_dir: Path, labels: Labels, save_scores: bool,
           summary: Summary) -> None:
    ids = labels.to_id[outputs] if labels.to_id is not None else outputs
    full = Image.fromarray(ids.astype(np.uint8)).resize(done.image.size, Image.NEAREST)
    ids = np.asarray(full)
    base = out_dir / done.name
    base.parent.mkdir(parents=True, exist_ok=True)
    save_label_map(base.with_name(base.name + ".png"), ids, labels)
    save_overlay(base.with_name(base.name + "_overlay.jpg"), done.image, ids, labels)
    if save_scores:
        with atomic_output(base.with_name(base.name + "_scores.npz")) as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, probabilities=np.exp(done.scores).astype(np.float16))
    summary.written += 1
