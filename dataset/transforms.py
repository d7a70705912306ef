"""Image/label transforms of the STEGO family, applied to both with the same geometry.

The original applied two separately composed pipelines and re-seeded the random generators between them so
that ``RandomCrop`` picked the same window twice. Here one ``PairTransform`` draws the window once and
crops both, which gives the same result without the seeding trick.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode, RandomCrop

from config import EVAL_RES
from dataset.image import IMAGENET_MEAN, IMAGENET_STD

LOADER_CROPS = ("center", "random", None)  # dataset.loader_crop_type values; None = resize to (res, res)


@dataclass(frozen=True)
class PairTransform:
    """Resize (nearest) and crop an image and its label map identically; normalise the image.

    ``crop`` is "center" or "random" (resize the shorter side to ``res``, then crop ``res`` x ``res``),
    or None (resize both sides to ``res``, no crop), as STEGO's ``get_transform``.
    """

    res: int
    crop: Optional[str]

    def __post_init__(self) -> None:
        if self.crop not in LOADER_CROPS:
            raise ValueError(f"unknown crop {self.crop!r}; expected one of {LOADER_CROPS}")

    def __call__(self, image: Image.Image, label: np.ndarray) -> tuple[Tensor, Tensor]:
        """``label`` holds class ids (int, -1 = ignore) of the image's size; returns (3 x H x W, H x W int64)."""
        label_img = Image.fromarray(label.astype(np.int32))  # mode "I": nearest resize keeps negative ids
        size = [self.res, self.res] if self.crop is None else self.res
        image = TF.resize(image, size, InterpolationMode.NEAREST)
        label_img = TF.resize(label_img, size, InterpolationMode.NEAREST)
        if self.crop == "center":
            image, label_img = TF.center_crop(image, self.res), TF.center_crop(label_img, self.res)
        elif self.crop == "random":
            top, left, height, width = RandomCrop.get_params(image, (self.res, self.res))
            image = TF.crop(image, top, left, height, width)
            label_img = TF.crop(label_img, top, left, height, width)
        img = TF.normalize(TF.to_tensor(image), IMAGENET_MEAN, IMAGENET_STD)
        return img, torch.from_numpy(np.asarray(label_img, dtype=np.int64).copy())


def train_transform(res: int, loader_crop_type: Optional[str]) -> PairTransform:
    """The training loader's transform: ``dataset.res`` and ``dataset.loader_crop_type``."""
    return PairTransform(res, loader_crop_type)


def eval_transform(res: int = EVAL_RES) -> PairTransform:
    """The evaluation transform (``eval.res``): shorter side to ``res``, centre crop ``res`` x ``res``."""
    return PairTransform(res, "center")
