"""The dense CRF with pydensecrf (Krähenbühl's C++ code), the evaluation protocol's backend: STEGO's crf.py (itself
from Van Gansbeke et al.), which PPAP copies. The scores are resized to the image (bilinear), turned into
probabilities (softmax) and refined by 10 mean-field iterations of a fully connected CRF with a Gaussian smoothness
kernel and a bilateral appearance kernel. Numpy only, so that the pool's workers need not import torch."""
from __future__ import annotations

import numpy as np
import pydensecrf.densecrf as dcrf
from pydensecrf.utils import unary_from_softmax

from crf.parameters import (CRF_BI_RGB_STD, CRF_BI_W, CRF_BI_XY_STD, CRF_MAX_ITER, CRF_POS_W, CRF_POS_XY_STD,
                            UNARY_CLIP)


def check_inputs(image: np.ndarray, scores: np.ndarray) -> None:
    """An HxWx3 uint8 image and CxhxW finite float scores, or a ValueError that says what is wrong."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be an HxWx3 uint8 array, got shape {image.shape} and dtype {image.dtype}")
    if scores.ndim != 3 or not np.issubdtype(scores.dtype, np.floating):
        raise ValueError(f"scores must be a CxHxW float array, got shape {scores.shape} and dtype {scores.dtype}")
    if min(image.shape[:2]) < 1 or min(scores.shape) < 1:
        raise ValueError(f"empty input: image {image.shape}, scores {scores.shape}")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinite values")


# Source indices and the weight of the upper one, in float32 and in the order torch's bilinear resize
# (align_corners=False, no antialiasing) computes them; results agree with it to a few float32 ulps.
def _linear_taps(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scale = np.float32(size_in) / np.float32(size_out)
    source = np.maximum((np.arange(size_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5), 0)
    lower = np.minimum(source.astype(np.int64), size_in - 1)
    upper = np.minimum(lower + 1, size_in - 1)
    return lower, upper, np.clip(source - lower, 0, 1).astype(np.float32)


def _resize_bilinear(scores: np.ndarray, height: int, width: int) -> np.ndarray:
    # CxhxW -> CxHxW as F.interpolate(mode="bilinear", align_corners=False), so that workers need not import torch
    if scores.shape[1:] == (height, width):
        return scores
    lower, upper, weight = _linear_taps(scores.shape[2], width)  # along W first, then H, in torch's order
    columns = scores[:, :, lower] * (1 - weight) + scores[:, :, upper] * weight
    lower, upper, weight = _linear_taps(scores.shape[1], height)
    weight = weight[None, :, None]
    return columns[:, lower, :] * (1 - weight) + columns[:, upper, :] * weight


def _softmax(scores: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores - scores.max(axis=0, keepdims=True))
    return shifted / shifted.sum(axis=0, keepdims=True)


def refine(image: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """CxhxW scores on an HxWx3 uint8 RGB image (checked by ``check_inputs``) -> CxHxW float32 probabilities."""
    height, width = image.shape[:2]
    n_classes = scores.shape[0]
    probs = _softmax(_resize_bilinear(scores.astype(np.float32, copy=False), height, width))
    unary = np.ascontiguousarray(unary_from_softmax(probs, clip=UNARY_CLIP))
    # STEGO passes the image as BGR. One colour std for all channels makes the CRF model itself independent of the
    # channel order, but its permutohedral-lattice approximation is not symmetric in the feature dimensions: RGB
    # and BGR give different probabilities, not only in the last bits. We keep BGR to reproduce the original.
    bgr = np.ascontiguousarray(image[:, :, ::-1])
    crf = dcrf.DenseCRF2D(width, height, n_classes)
    crf.setUnaryEnergy(unary)
    crf.addPairwiseGaussian(sxy=CRF_POS_XY_STD, compat=CRF_POS_W)
    crf.addPairwiseBilateral(sxy=CRF_BI_XY_STD, srgb=CRF_BI_RGB_STD, rgbim=bgr, compat=CRF_BI_W)
    q = crf.inference(CRF_MAX_ITER)
    return np.asarray(q, dtype=np.float32).reshape(n_classes, height, width)
