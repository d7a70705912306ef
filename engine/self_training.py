"""The second stage: a student trained on the cluster maps of a teacher (docs/self_training.md).

With ``self_training.checkpoint`` set, a run's network and probes start from that first-stage checkpoint: they are the
student. The teacher is a copy of the network's decoder and of the cluster probe; the frozen ViT is the student's (the
weights are the same), so the teacher's head runs on the frozen tokens of the student's own forward pass and costs one
transformer block. For each training image it gives a cluster map at the training resolution: the nearest centroid
by the cosine similarities of the patches' codes to the centroids, upsampled bilinearly to the image size (the
evaluation upsamples the code and then takes the similarities, which agrees except near patch borders and costs the
code's width in memory per pixel: docs/self_training.md says how often they agree):
- ``tta``: the code averaged with the mirrored code of the mirrored image (one more pass of the frozen ViT);
- ``crf``: refined by the dense CRF of that backend, from log-softmax(2 x the similarities), as evaluations refine;
- each pixel's confidence is the probability of its cluster: softmax(similarities / ``temperature``), or with the
  CRF the CRF's marginal; pixels below ``confidence`` are ignored;
- ``masks`` "primaps": the labels are instead PriMaPs' principal masks of the teacher's code (engine/primaps.py),
  refined by the CRF, each filled with the most frequent cluster of the teacher's map inside it.
The student learns the map by cross-entropy (``loss.probe_cross_entropy``) on its cluster probe's similarities /
``temperature`` on the patch grid, upsampled as the linear probe's logits are; the gradient reaches the centroids and
the decoder; ``focal`` weighs each cluster's pixels by (1 - its share of the batch's pseudo-labels) ** focal, so
that the large clusters do not swallow the small (as PriMaPs-EM's focal loss). ``ppap_weight`` adds the PPAP
loss; at 0 the projection head, which only feeds that loss, is not trained.
The linear probe learns on the labels as in the first stage: it measures. The labels reach neither the teacher nor
the student's network and cluster probe.

The teacher (``teacher``): "ema" follows the student, teacher = decay x teacher + (1 - decay) x student after every
optimizer step (PriMaPs-EM's momentum prototypes, here the decoder too); "fixed" stays the first stage; "epoch" is
renewed as a copy of the student at the start of every epoch. The maps are computed on the fly, so nothing is written
to disk and a random crop gets the map of what the student sees. Checkpoints hold the teacher
(``teacher_state_dict``) and record the stage and the teacher's checkpoint (``self_training``).
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, NamedTuple, Optional

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import Tensor, nn

from config import ModelConfig, SelfTrainingConfig
from crf.refiner import Refiner
from dataset.classes import IGNORE
from dataset.image import IMAGENET_MEAN, IMAGENET_STD, denormalize_batch
from engine.checkpoint import check_fits, load_checkpoint, load_networks
from engine.evaluate import CRF_CLUSTER_ALPHA, checkpoint_sha256
from engine.primaps import principal_masks, vote
from loss import probe_cross_entropy
from model.ppap import ClusterProbe, Frozen, NetOutput, PPAPNet
from utils.distributed import ONE_PROCESS, World
from utils.errors import UserError

TEACHER_KEY, RECORD_KEY = "teacher_state_dict", "self_training"  # what a second stage's checkpoints add
# the student's augmentation (``augment``), PriMaPs-EM's: a Gaussian blur of random sigma, then half of the images
# are colour-jittered with probability 0.3 and the other half made grey with probability 0.1
BLUR_KERNEL, BLUR_SIGMA = 21, (0.1, 2.0)
JITTER_P, GREY_P, JITTER = 0.3, 0.1, 0.1  # brightness, contrast, saturation factors in 1 +- 0.1, hue in +- 0.1


class Teacher(nn.Module):
    """The teacher's own parts: a copy of the network's decoder and of the cluster probe, never trained by a
    gradient."""

    def __init__(self, net: PPAPNet, cluster: ClusterProbe) -> None:
        super().__init__()
        self.decoder = copy.deepcopy(net.decoder).requires_grad_(False)
        self.cluster = copy.deepcopy(cluster).requires_grad_(False)

    @torch.no_grad()
    def follow(self, net: PPAPNet, cluster: ClusterProbe, decay: float) -> None:
        """teacher = decay x teacher + (1 - decay) x student, parameter by parameter; decay 0 copies the student."""
        for mine, theirs in zip(self.parameters(), [*net.decoder.parameters(), *cluster.parameters()], strict=True):
            if decay == 0.0:
                mine.copy_(theirs)
            else:
                mine.lerp_(theirs.to(mine.dtype), 1.0 - decay)


class PseudoLabels(NamedTuple):
    labels: Tensor  # B x H x W cluster ids at the image size; IGNORE where the teacher is not confident
    confidence: Tensor  # B x H x W: the teacher's probability of the pixel's cluster


@torch.no_grad()
def teacher_code(net: PPAPNet, teacher: Teacher, frozen: Frozen, img: Tensor, tta: bool = False) -> Tensor:
    """B x C x h x w: the teacher's code of ``img`` on the patch grid; ``tta``: averaged with the mirrored code of the
    mirrored image."""
    code = net.head(frozen, teacher.decoder)
    if tta:
        code = (code + net.head(net.frozen(img.flip(-1)), teacher.decoder).flip(-1)) / 2
    return code


@torch.no_grad()
def teacher_similarities(net: PPAPNet, teacher: Teacher, frozen: Frozen, img: Tensor, is_direct: bool = False,
                         code: Optional[Tensor] = None) -> Tensor:
    """B x K x H x W: the cosine similarity of each patch's teacher code (``code``, or ``teacher_code()`` without TTA)
    to each of the teacher's centroids, upsampled bilinearly to the image size of ``img`` (as the student's logits
    are)."""
    if code is None:
        code = teacher_code(net, teacher, frozen, img)
    inner = teacher.cluster(code, is_direct=is_direct).inner
    return F.interpolate(inner, img.shape[-2:], mode="bilinear", align_corners=False)


def confident(probs: Tensor, threshold: float) -> PseudoLabels:
    """The most probable cluster of each pixel of B x K x H x W ``probs``; IGNORE where its probability is below
    ``threshold``."""
    confidence, labels = probs.max(1)
    return PseudoLabels(labels.masked_fill(confidence < threshold, IGNORE), confidence)


def focal_weights(labels: Tensor, n_clusters: int, focal: float, world: World = ONE_PROCESS) -> Tensor:
    """(1 - share) ** ``focal`` per cluster, its share being the fraction of the global batch's kept pseudo-labels
    that name it (PriMaPs-EM's focal loss takes the share from the student's mean probability of each class in a
    process's batch instead)."""
    kept = labels[(labels >= 0) & (labels < n_clusters)]
    counts = world.sum(torch.bincount(kept, minlength=n_clusters).double())
    return (1.0 - counts / counts.sum().clamp_min(1.0)) ** focal


def augmentation(n: int, generator: torch.Generator) -> Tensor:
    """n x 7 parameters of the student's augmentation, drawn from ``generator``: blur sigma, jitter (1/0), grey (1/0),
    brightness, contrast and saturation factors, hue shift."""
    u = torch.rand(n, 7, generator=generator, dtype=torch.float64)
    jitter = (u[:, 1] < 0.5) & (u[:, 2] < JITTER_P)
    grey = (u[:, 1] >= 0.5) & (u[:, 2] < GREY_P)
    factors = 1.0 + JITTER * (2 * u[:, 3:6] - 1)
    return torch.cat([BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * u[:, :1], jitter[:, None], grey[:, None],
                      factors, JITTER * (2 * u[:, 6:] - 1)], 1)


def augment(img: Tensor, params: Tensor) -> Tensor:
    """Normalised B x 3 x H x W images, each augmented by its row of ``params`` (``augmentation()``) in RGB [0, 1]:
    blurred, then colour-jittered (brightness, contrast, saturation, hue, in that order) or made grey."""
    mean = torch.tensor(IMAGENET_MEAN, device=img.device, dtype=img.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=img.device, dtype=img.dtype).view(1, 3, 1, 1)
    rgb = (img * std + mean).clamp(0.0, 1.0)
    out = []
    for one, (sigma, jitter, grey, brightness, contrast, saturation, hue) in zip(rgb, params.tolist()):
        one = TF.gaussian_blur(one, [BLUR_KERNEL, BLUR_KERNEL], [sigma, sigma])
        if jitter:
            one = TF.adjust_hue(TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(
                one, brightness), contrast), saturation), hue)
        elif grey:
            one = TF.rgb_to_grayscale(one, num_output_channels=3)
        out.append(one)
    return (torch.stack(out) - mean) / std


class SelfTraining:
    """A second stage's teacher, its pseudo-labels and the student's loss; a context manager (the CRF's pool)."""

    def __init__(self, cfg: SelfTrainingConfig, teacher: Teacher, record: dict[str, Any], is_direct: bool) -> None:
        self.cfg, self.teacher, self.record, self.is_direct = cfg, teacher, record, is_direct
        self.refiner = Refiner(cfg.crf, cfg.crf_workers, output="probs") if cfg.crf else None
        self.kept = math.nan  # the fraction of the last global batch's pixels the confidence kept

    def __enter__(self) -> SelfTraining:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.refiner is not None:
            self.refiner.__exit__(*exc)

    @torch.no_grad()
    def pseudo_labels(self, net: PPAPNet, frozen: Frozen, img: Tensor) -> PseudoLabels:
        """The teacher's cluster maps of ``img`` (whose frozen ViT pass is ``frozen``)."""
        code = teacher_code(net, self.teacher, frozen, img, self.cfg.tta)
        inner = teacher_similarities(net, self.teacher, frozen, img, is_direct=self.is_direct, code=code).float()
        if self.cfg.masks == "primaps":
            return self.mask_labels(code, inner, img)
        if self.refiner is None:
            return confident(F.softmax(inner / self.cfg.temperature, dim=1), self.cfg.confidence)
        self.refiner.submit(range(img.shape[0]), denormalize_batch(img), [F.log_softmax(CRF_CLUSTER_ALPHA * inner, 1)])
        probs = torch.stack([maps[0] for _, maps in self.refiner.results()])
        return confident(probs, self.cfg.confidence)

    def mask_labels(self, code: Tensor, inner: Tensor, img: Tensor) -> PseudoLabels:
        """``masks`` "primaps": each image's principal masks of its teacher ``code``, refined by the CRF (or their
        softmax upsampled bilinearly), each labelled by the most frequent cluster of the teacher's map (the argmax of
        ``inner``) inside it; the confidence is the pixel's probability of its mask, the background is ignored."""
        scores = [F.log_softmax(principal_masks(one, self.cfg.mask_threshold), 0) for one in code]
        if self.refiner is not None:
            images = denormalize_batch(img)
            for j, one in enumerate(scores):
                self.refiner.submit([j], images[j:j + 1], [one[None]])
            probs = [maps[0] for _, maps in self.refiner.results()]
        else:
            probs = [F.softmax(F.interpolate(one[None], img.shape[-2:], mode="bilinear", align_corners=False), 1)[0]
                     for one in scores]
        clusters = inner.argmax(1)
        labels, confidence = [], []
        for one, prior in zip(probs, clusters):
            conf, masks = one.max(0)
            labels.append(vote(masks, prior, inner.shape[1]).masked_fill(conf < self.cfg.confidence, IGNORE))
            confidence.append(conf)
        return PseudoLabels(torch.stack(labels), torch.stack(confidence))

    def student_input(self, img: Tensor, generator: Optional[torch.Generator], world: World = ONE_PROCESS) -> Tensor:
        """What the student sees of this process's ``img``: the image, or with ``augment`` its augmentation, whose
        parameters are drawn from ``generator`` for the global batch (this process takes the rows of its images)."""
        if not self.cfg.augment:
            return img
        n = img.shape[0]
        params = augmentation(n * world.size, generator if generator is not None else torch.default_generator)
        with torch.no_grad():
            return augment(img, params[world.rank * n:(world.rank + 1) * n])

    def loss(self, net: PPAPNet, out: NetOutput, img: Tensor, cluster: nn.Module, world: World = ONE_PROCESS) -> Tensor:
        """The student's cross-entropy on the teacher's maps of ``img`` (``out``: the student's forward pass of
        ``student_input(img)``; ``cluster``: the student's cluster probe, as training calls it); this process's part
        of the global batch's loss."""
        with torch.no_grad():  # the teacher sees the image itself: its frozen pass is the student's unless augmented
            frozen = net.frozen(img) if self.cfg.augment else out.frozen
        pseudo = self.pseudo_labels(net, frozen, img)
        kept = world.sum(torch.stack([(pseudo.labels != IGNORE).sum(), torch.tensor(pseudo.labels.numel())
                                      .to(pseudo.labels.device)]).double())
        self.kept = float(kept[0] / kept[1])
        logits = cluster(out.code, is_direct=self.is_direct).inner / self.cfg.temperature
        weight = focal_weights(pseudo.labels, logits.shape[1], self.cfg.focal, world) if self.cfg.focal else None
        return probe_cross_entropy(logits, pseudo.labels, logits.shape[1], world, weight)

    def start_epoch(self, net: PPAPNet, cluster: ClusterProbe) -> None:
        """Teacher "epoch": renewed as a copy of the student at the start of an epoch."""
        if self.cfg.teacher == "epoch":
            self.teacher.follow(net, cluster, 0.0)

    def after_step(self, net: PPAPNet, cluster: ClusterProbe) -> None:
        """Teacher "ema": one step of the moving average, after the student's optimizer step."""
        if self.cfg.teacher == "ema":
            self.teacher.follow(net, cluster, self.cfg.ema_decay)

    def checkpoint_entries(self) -> dict[str, Any]:
        """What a second stage's checkpoints hold beside the first stage's keys."""
        return {TEACHER_KEY: {k: v.detach().cpu() for k, v in self.teacher.state_dict().items()},
                RECORD_KEY: self.record}


def start_self_training(cfg: SelfTrainingConfig, net: PPAPNet, linear: nn.Module, cluster: ClusterProbe,
                        model_cfg: ModelConfig, n_classes: int, is_direct: bool,
                        resumed: Optional[dict[str, Any]] = None) -> Optional[SelfTraining]:
    """None without ``cfg.checkpoint``. A new second stage loads the first stage's checkpoint into ``net``,
    ``linear`` and ``cluster`` (the student) and copies the teacher from them; a resumed one (``resumed``: its
    last.pth) takes the teacher and the record from that file, not from the first stage's (which may have moved)."""
    if cfg.checkpoint is None:
        return None
    if resumed is not None:
        teacher = Teacher(net, cluster)
        teacher.load_state_dict(resumed[TEACHER_KEY])
        return SelfTraining(cfg, teacher, resumed[RECORD_KEY], is_direct)
    path = Path(cfg.checkpoint)
    if not path.is_file():
        raise UserError(f"self_training.checkpoint: {path} not found; name the first stage's checkpoint (a run's "
                        f"label_free.pth, last.pth or best.pth, or a released checkpoint)")
    source = f"self_training.checkpoint {path}"
    first = load_checkpoint(path)
    check_fits(first, model_cfg, n_classes, source)
    load_networks(first, net, linear, cluster, source)
    stage = int(first.get(RECORD_KEY, {}).get("stage", 1)) + 1
    record = {"stage": stage, "teacher": {"checkpoint": str(path.resolve()), "sha256": checkpoint_sha256(path),
                                          "iter": first.get("iter")}}
    return SelfTraining(cfg, Teacher(net, cluster), record, is_direct)
