"""Segment images that have no labels: a trained model's class (or cluster) map of every input image, as a palette PNG
that reads back as ids, and an overlay of the image with its colours and a legend of the classes present.

Each image is read as RGB (``dataset.base.read_image``: any mode PIL opens) and turned upright by its EXIF
orientation, as every viewer shows it (phone photos are stored sideways), resized as evaluation sizes images (the
shorter side to 320 px) with each side then brought to a multiple of the patch size by the same resize (never a
one-sided crop or pad, so that mirroring an image commutes with its preprocessing; bilinear with antialiasing),
segmented (``engine.evaluate.segment_code``, with flip TTA on request), optionally refined by the dense CRF of
evaluation, and the label map is brought back to the image's own size (nearest). Memory: the network's input is at
most ``MAX_SIDE`` pixels on its longer side; full-size work (decoding, the label map, the overlay) is 8- and 16-bit;
PIL refuses images beyond its decompression-bomb limit (about 179 million pixels), which are named and skipped.
predict.py never reads its own outputs: it marks its output folder (``OUTPUT_MARKER``) and skips marked folders.
"""
from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Optional, Sequence

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image, ImageDraw, ImageFont, ImageOps
from torch import Tensor, nn
from tqdm import tqdm

from dataset.base import read_image
from dataset.transforms import EVAL_RES
from engine.evaluate import CRF_CLUSTER_ALPHA, checkpoint_sha256, segment_code
from engine.rundir import REPORT_SUFFIX
from crf.refiner import Refiner
from utils.device import autocast
from utils.errors import DataError, UserError
from utils.files import atomic_output, write_text_atomically
from dataset.image import IMAGENET_MEAN, IMAGENET_STD, denormalize_batch
from utils import signals

log = logging.getLogger(__name__)

IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "TIFF", "BMP")  # PIL's names of the formats read
OTHER_IMAGE_FORMATS = {".heic": "HEIC", ".heif": "HEIF", ".svg": "SVG"}  # picture formats PIL does not register
NAMED_AT_MOST = 5  # inputs a line names before it counts the rest
OUTPUT_MARKER = ".ppap-predictions"  # the file that marks a folder of predict.py's outputs
MAX_SIDE = 2048  # the longest side fed to the network; longer images are scaled down to it
OVERLAY_QUALITY = 90
LEGEND_SWATCH = 14  # pixels
UNMATCHED_COLOR = (128, 128, 128)
OUTPUT_SUFFIXES = (".png", "_overlay.jpg")  # NAME.png, NAME_overlay.jpg
SCORES_SUFFIX = "_scores.npz"
NO_REPORT_HINT = "run eval.py on the checkpoint first, or predict with --probe linear"


@dataclass(frozen=True)
class Input:
    path: Path
    name: Path  # the output name without suffix, relative to the output folder


class Inputs(NamedTuple):
    images: list[Input]
    unsupported: list[tuple[Path, str]]  # (file, its format): images of a format predict.py does not read
    not_read: list[str]  # predict.py's output folders among the inputs, each with why it is one


def collect_inputs(arguments: Sequence[str], out_dir: Path) -> Inputs:
    """Image files, folders (recursively) and glob patterns -> inputs with their output names: the path relative to
    the folder argument (a file or a pattern's match: its name alone), the extension kept in the name where two
    inputs would otherwise share one.

    Nothing in an output folder of predict.py is an input: ``out_dir`` and the folders earlier runs marked with
    ``OUTPUT_MARKER``, wherever they lie. Files of other image formats (GIF, HEIC, ...) are listed apart; in a folder,
    files that are no images at all are passed over."""
    outputs = _OutputFolders(out_dir)
    found: list[tuple[Path, Path]] = []
    unsupported: list[tuple[Path, str]] = []
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            kinds = [(p, _format(p)) for p in outputs.walk(path)]
            unsupported += [(p, kind) for p, kind in kinds if kind not in (None, *IMAGE_FORMATS)]
            found += [(p, p.relative_to(path)) for p, kind in kinds if kind in IMAGE_FORMATS]
            continue
        if path.is_file():
            matches = [path]
        elif glob.has_magic(argument):
            matches = sorted(Path(p) for p in glob.glob(argument, recursive=True) if Path(p).is_file())
            if not matches:
                raise UserError(f"{argument}: no file matches this pattern")
        else:
            raise UserError(f"{argument}: no such file or folder")
        for match in (p for p in matches if not outputs.leaves_out(p.parent)):
            if _format(match) in (None, *IMAGE_FORMATS):  # a file named outright is read whatever its suffix
                found.append((match, Path(match.name)))
            else:
                unsupported.append((match, _format(match)))
    if not found:
        said = f"no images found in {', '.join(arguments)} (looked for {', '.join(IMAGE_FORMATS)})"
        if outputs.not_read:
            said += f"; not read, as predict.py never reads its outputs: {', '.join(outputs.not_read.values())}"
        if outputs.out in outputs.not_read:
            said += "; --out wants a folder of its own, apart from the inputs"
        if unsupported:
            said += f"; {unsupported_line(unsupported)}"
        raise UserError(said)
    stems: dict[Path, int] = {}
    for _, rel in found:
        stems[rel.with_suffix("")] = stems.get(rel.with_suffix(""), 0) + 1
    images = [Input(p, rel.with_suffix("") if stems[rel.with_suffix("")] == 1 else rel) for p, rel in found]
    return Inputs(images, unsupported, list(outputs.not_read.values()))


def _format(path: Path) -> Optional[str]:
    """The image format PIL gives files of this suffix ("JPEG", "GIF", ...); None for a suffix of no image format."""
    suffix = path.suffix.lower()
    return Image.registered_extensions().get(suffix, OTHER_IMAGE_FORMATS.get(suffix))


class _OutputFolders:
    """predict.py's output folders: ``--out`` and the folders that carry ``OUTPUT_MARKER``, noted as inputs meet
    them."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir, self.out = out_dir, out_dir.resolve()
        self.not_read: dict[Path, str] = {}  # resolved folder -> "FOLDER (why)"
        self._holders: dict[Path, Optional[Path]] = {}

    def _is_one(self, folder: Path) -> bool:
        return folder == self.out or (folder / OUTPUT_MARKER).is_file()

    def _note(self, folder: Path, shown: Path) -> None:
        why = "--out" if folder == self.out else f"an earlier output folder: it holds {OUTPUT_MARKER}"
        self.not_read.setdefault(folder, f"{shown} ({why})")

    def _holder(self, folder: Path) -> Optional[Path]:
        """The output folder that is ``folder`` (resolved) or holds it; None where there is none."""
        if folder not in self._holders:
            parent = folder.parent
            self._holders[folder] = (folder if self._is_one(folder) else
                                     None if parent == folder else self._holder(parent))
        return self._holders[folder]

    def leaves_out(self, folder: Path) -> bool:
        """Whether ``folder`` is an output folder or lies in one (noted)."""
        resolved = folder.resolve()
        found = self._holder(resolved)
        if found is not None:
            self._note(found, folder if found == resolved else found)
        return found is not None

    def walk(self, root: Path) -> list[Path]:
        """The files under ``root`` (sorted) outside output folders."""
        if self.leaves_out(root):
            return []
        if self.out.is_relative_to(root.resolve()):  # said even before the first run has created it
            self._note(self.out, self.out_dir)
        files = []
        for folder, subfolders, names in os.walk(root):
            for name in list(subfolders):  # os.walk enters only the subfolders left in the list
                subfolder = Path(folder) / name
                if self._is_one(subfolder.resolve()):
                    self._note(subfolder.resolve(), subfolder)
                    subfolders.remove(name)
            files += [Path(folder) / name for name in names if (Path(folder) / name).is_file()]
        return sorted(files)


def unsupported_line(unsupported: Sequence[tuple[Path, str]]) -> str:
    """One line naming the inputs of an unsupported format, or counting them and naming the first few."""
    named = ", ".join(f"{path} ({kind})" for path, kind in unsupported[:NAMED_AT_MOST])
    more = f" and {len(unsupported) - NAMED_AT_MOST} more" if len(unsupported) > NAMED_AT_MOST else ""
    inputs = f"{len(unsupported)} input{'s' * (len(unsupported) != 1)}"
    return (f"skipped {inputs} of an unsupported format (predict.py reads single {', '.join(IMAGE_FORMATS)} "
            f"images): {named}{more}")


def mark_output_folder(out_dir: Path) -> None:
    """Create ``out_dir`` and mark it as predict.py's: no later run reads it as input, even inside an input folder."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out_dir / OUTPUT_MARKER, "predict.py writes its outputs into this folder and never reads "
                                                   "a folder that holds this file as input\n")


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


class ReportChoice(NamedTuple):
    """The report whose cluster matching names the clusters (``path`` None: none; they are drawn as "cluster k"),
    and one line that says which report, or why none."""

    path: Optional[Path]
    report: Optional[dict[str, Any]]
    line: str


def choose_report(checkpoint: Path, given: Optional[Path], force: bool = False) -> ReportChoice:
    """The report that names ``checkpoint``'s clusters: ``given`` (``--matching``), else ``{stem}_eval_report.json``
    beside the checkpoint, only where it records this very checkpoint (``engine.evaluate.save_report``): the report
    beside it by its resolved path and SHA-256, ``given`` by the SHA-256 (a copy of the file elsewhere has the same
    clusters). A ``given`` report of another checkpoint raises ``UserError``, unless ``force``."""
    if given is not None:
        report = read_report(given)
        other = _records_another(report, checkpoint, by_path=False)
        if other and not force:
            raise UserError(f"{given} {other}, not {checkpoint}: its matching names another model's clusters; run "
                            f"eval.py on {checkpoint}, or pass --force-matching to use it anyway")
        return ReportChoice(given, report, f"clusters named by the matching in {given}"
                                           + (f", which {other} (--force-matching)" if other else ""))
    beside = checkpoint.parent / f"{checkpoint.stem}{REPORT_SUFFIX}"
    unnamed = f'clusters are drawn as "cluster k" (run eval.py on {checkpoint} to name them, or use --probe linear)'
    if not beside.is_file():
        return ReportChoice(None, None, f"no {beside.name} beside {checkpoint}: {unnamed}")
    report = read_report(beside)
    other = _records_another(report, checkpoint, by_path=True)
    if other:
        return ReportChoice(None, None, f"{beside} {other}: {unnamed}")
    return ReportChoice(beside, report, f"clusters named by the matching in {beside}")


def _records_another(report: dict[str, Any], checkpoint: Path, by_path: bool) -> Optional[str]:
    """How ``report`` records a checkpoint other than ``checkpoint`` ("records /old/last.pth"); None where it
    records this one (its SHA-256, and with ``by_path`` its resolved path too)."""
    recorded, sha256 = report.get("checkpoint"), report.get("checkpoint_sha256")
    if not sha256:
        return "records no SHA-256 of its checkpoint (an older eval.py wrote it)"
    if by_path and recorded != str(checkpoint.resolve()):
        return f"records {recorded}"
    if sha256 != checkpoint_sha256(checkpoint):
        return f"records another checkpoint ({recorded}, SHA-256 {sha256})"
    return None


def read_report(path: Path) -> dict[str, Any]:
    """eval.py's report in ``path``; a file that is none raises ``UserError``."""
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(report, dict):
            raise ValueError(f"a JSON {type(report).__name__}, not an object")
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: not an eval_report.json ({type(err).__name__}: {err}); {NO_REPORT_HINT}") from None
    return report


def read_matching(report: dict[str, Any], path: Path, crf: bool, n_clusters: int, class_names: list[str]) -> list[int]:
    """The cluster -> class list that eval.py stored in ``report`` (read from ``path``; after CRF for ``crf``)."""
    try:
        matching = report["matching"]
        mapping = matching["crf" if crf and "crf" in matching else "no_crf"]
    except (KeyError, TypeError) as err:
        raise UserError(f"{path}: not an eval_report.json with a cluster matching ({type(err).__name__}: {err}); "
                        f"{NO_REPORT_HINT}") from None
    if len(mapping) != n_clusters or matching.get("classes") != class_names:
        raise UserError(f"{path}: its matching is for {len(mapping)} clusters and the classes "
                        f"{matching.get('classes')}; the model has {n_clusters} clusters and the classes {class_names}")
    return [int(c) for c in mapping]


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
    image: Image.Image  # upright (as viewers show it), for the size and the overlay
    scores: np.ndarray  # C x H x W log-probabilities at the network's input size


@dataclass
class Summary:
    written: int = 0
    kept: int = 0  # images whose outputs were all present (skip_existing)
    failed: list[tuple[Path, str]] = field(default_factory=list)  # (input, why)
    unsupported: list[tuple[Path, str]] = field(default_factory=list)  # (input, its kind): animations, multi-page

    def line(self) -> str:
        text = f"{self.written} image{'s' * (self.written != 1)} written"
        if self.kept:
            text += f", {self.kept} kept (their outputs were all there)"
        if self.failed:
            text += f", {len(self.failed)} failed: " + "; ".join(f"{p} ({why})" for p, why in self.failed)
        return text


def predict(net: nn.Module, linear: nn.Module, cluster: nn.Module, inputs: Sequence[Input], out_dir: Path,
            labels: Labels, probe: str, device: torch.device, precision: str, tta: bool = False,
            crf: bool = False, crf_workers: Optional[int] = None, save_scores: bool = False,
            batch_size: int = 8, crf_backend: str = "pydensecrf", skip_existing: bool = False) -> Summary:
    """Segment ``inputs`` into ``out_dir``: ``NAME.png`` and ``NAME_overlay.jpg`` (and ``NAME_scores.npz``) each,
    of the image turned as viewers show it (``read_upright``); with ``skip_existing`` an image whose outputs are all
    there is kept as it is. Animations and multi-page files are listed in the summary, not segmented.

    Consecutive images that the network sees at the same size (the frames of a video, a camera's photos) go through
    it in batches of up to ``batch_size``; with ``crf`` the dense CRF of ``crf_backend`` refines them (a pool of
    workers refines earlier images meanwhile)."""
    for m in (net, linear, cluster):
        m.eval()
    summary = Summary()
    refiner = Refiner(crf_backend, crf_workers) if crf else None
    waiting: dict[Path, Prediction] = {}  # images being refined

    def write(done: Prediction, outputs: np.ndarray) -> None:
        _write(done, outputs, out_dir, labels, save_scores, summary)

    def run(batch: list[tuple[Input, Image.Image, Tensor]]) -> None:
        img = torch.stack([tensor for _, _, tensor in batch]).to(device)
        with autocast(device, precision):
            code = F.interpolate(segment_code(net, img, tta), img.shape[-2:], mode="bilinear", align_corners=False)
            scores = linear(code) if probe == "linear" else CRF_CLUSTER_ALPHA * cluster(code).inner
        log_probs = F.log_softmax(scores.float(), dim=1)
        host = log_probs.cpu().numpy()
        done = [Prediction(item.name, image, host[j]) for j, (item, image, _) in enumerate(batch)]
        if refiner is None:
            for prediction in done:
                write(prediction, prediction.scores.argmax(0))
            return
        waiting.update((prediction.name, prediction) for prediction in done)
        refiner.submit([prediction.name for prediction in done], denormalize_batch(img), [log_probs])
        for name, (refined,) in refiner.ready():
            write(waiting.pop(name), refined.cpu().numpy())

    with refiner or contextlib.nullcontext(), torch.inference_mode():
        readable = _readable(inputs, net.patch_size, summary, out_dir if skip_existing else None, save_scores)
        for batch in _batches(readable, batch_size):
            run(batch)
        if refiner is not None:
            for name, (refined,) in refiner.results():
                write(waiting.pop(name), refined.cpu().numpy())
    return summary


def _readable(inputs: Sequence[Input], patch: int, summary: Summary, kept_in: Optional[Path],
              save_scores: bool) -> Iterator[tuple[Input, Image.Image, Tensor]]:
    """Each input read upright and prepared for the network; the inputs whose outputs are all in ``kept_in``, that
    hold several frames or that cannot be read are counted in ``summary`` instead."""
    for item in tqdm(inputs, desc="predict", unit="image", disable=None):
        signals.check()
        if kept_in is not None and all(path.is_file() for path in output_paths(kept_in, item.name, save_scores)):
            summary.kept += 1  # outputs are written atomically: one that is there is complete
            continue
        several = _several_frames(item.path)
        if several is not None:
            summary.unsupported.append((item.path, several))
            continue
        try:
            image = read_upright(item.path)
        except DataError as err:
            summary.failed.append((item.path, _reason(err)))
            log.warning("skipped %s", err)
            continue
        yield item, image, prepare(image, patch)


def _batches(readable: Iterator[tuple[Input, Image.Image, Tensor]],
             batch_size: int) -> Iterator[list[tuple[Input, Image.Image, Tensor]]]:
    """Consecutive inputs of one network size, up to ``batch_size`` at a time."""
    batch: list[tuple[Input, Image.Image, Tensor]] = []
    for entry in readable:
        if batch and (entry[2].shape != batch[0][2].shape or len(batch) == batch_size):
            yield batch
            batch = []
        batch.append(entry)
    if batch:
        yield batch


def _reason(err: DataError) -> str:
    """The reason of a read error without its path (the summary names the file): "truncated JPEG"-like."""
    text = str(err).split(": ", 1)[-1]
    return text.removeprefix("cannot read the image (").removesuffix("); the file is corrupt or not an image")


def _write(done: Prediction, outputs: np.ndarray, out_dir: Path, labels: Labels, save_scores: bool,
           summary: Summary) -> None:
    ids = labels.to_id[outputs] if labels.to_id is not None else outputs
    full = Image.fromarray(ids.astype(np.uint8)).resize(done.image.size, Image.NEAREST)
    ids = np.asarray(full)
    label_map, overlay, *scores = output_paths(out_dir, done.name, save_scores)
    save_label_map(label_map, ids, labels)
    save_overlay(overlay, done.image, ids, labels)
    if save_scores:
        with atomic_output(scores[0]) as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, probabilities=np.exp(done.scores).astype(np.float16))
    summary.written += 1


def output_paths(out_dir: Path, name: Path, save_scores: bool) -> list[Path]:
    """The files written for the input named ``name``: its label map, its overlay (and its scores)."""
    base = out_dir / name
    suffixes = OUTPUT_SUFFIXES + ((SCORES_SUFFIX,) if save_scores else ())
    return [base.with_name(base.name + suffix) for suffix in suffixes]


def read_upright(path: Path) -> Image.Image:
    """The image as RGB (``read_image``) turned as viewers show it: a camera stores a portrait photo sideways, with
    an EXIF orientation that says how to turn it. Datasets read pixels as stored: their labels are drawn on those."""
    image = read_image(path)
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except (OSError, ValueError, SyntaxError) as err:  # PIL's EXIF parser raises all three on corrupt data
        log.warning("%s: its EXIF data cannot be read (%s); segmented as stored", path, err)
    return image


def _several_frames(path: Path) -> Optional[str]:
    """"animated GIF, 12 frames"-like for an animation or a multi-page file, which one map cannot show; else None
    (errors are left to ``read_image``, which names them)."""
    try:
        with Image.open(path) as image:
            frames, kind = getattr(image, "n_frames", 1), image.format
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    if frames == 1 or kind == "MPO":  # MPO: a camera's JPEG photo followed by extra pictures (a preview, depth)
        return None
    return f"multi-page TIFF, {frames} pages" if kind == "TIFF" else f"animated {kind}, {frames} frames"
