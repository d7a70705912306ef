"""Image normalisation shared by the datasets, the CRF and the visualisation."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's ImageNet statistics, used by DINO, STEGO and PPAP
IMAGENET_STD = (0.229, 0.224, 0.225)
UINT8_MAX = 255


def denormalize_to_uint8(img: Tensor) -> np.ndarray:
    """A normalised 3xHxW image tensor (any device) -> an HxWx3 uint8 RGB array on the CPU."""
    if img.dim() != 3 or img.shape[0] != 3:
        raise ValueError(f"expected a 3xHxW image tensor, got shape {tuple(img.shape)}")
    return denormalize_batch(img[None])[0].cpu().numpy()


def denormalize_batch(img: Tensor) -> Tensor:
    """Normalised Bx3xHxW images -> BxHxWx3 uint8 RGB images, on the same device."""
    if img.dim() != 4 or img.shape[1] != 3:
        raise ValueError(f"expected a Bx3xHxW image tensor, got shape {tuple(img.shape)}")
    mean = torch.tensor(IMAGENET_MEAN, device=img.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=img.device).view(1, 3, 1, 1)
    rgb = img.detach().float() * std + mean
    # STEGO truncated with `.mul(255).byte()` (inside to_pil_image), which is one level too dark for about half of
    # the pixels; we round. The dense CRF's colour kernel (std 3 levels) is insensitive to that difference.
    scaled = (rgb * UINT8_MAX).round_().clamp_(0, UINT8_MAX).to(torch.uint8)
    return scaled.permute(0, 2, 3, 1).contiguous()
