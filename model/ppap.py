"""The PPAP network (a frozen ViT of the DINO family with a trainable copy of its last block) and the two probes.

State-dict names match the released PPAP checkpoints: the network's keys are ``model.*`` (the ViT),
``decoder.*`` and ``project_head.*``; the linear probe has ``weight`` and ``bias``; the cluster probe ``clusters``.
"""
from __future__ import annotations

import copy
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.vit import Rope, VisionTransformer, vit
from model.weights import load_backbone_weights
from config import ModelConfig

FEATS_DROPOUT = 0.1  # Dropout2d on the frozen features: the released models were trained with it


class Frozen(NamedTuple):
    """What the frozen ViT computes for a batch: the same for every head trained on it."""

    tokens: Tensor  # (B, tokens, C): the input of the ViT's last block, which the decoder takes instead
    rope: Rope  # the backbone's rotary embedding for this image size (None where the family has none)
    feats: Tensor  # (B, C, h, w): the final ViT features (patch tokens), before any dropout
    grid: tuple[int, int]  # (h, w) patches


class NetOutput(NamedTuple):
    code: Tensor  # (B, C, h, w): decoder output after the frozen final norm, CLS dropped
    z: Tensor  # (B*h*w, C): L2-normalised projection of the code, rows in (image, row, col) order
    feats: Tensor  # (B, C, h, w): frozen final ViT features after Dropout2d (identity in eval mode)
    frozen: Frozen  # what the frozen ViT computed: a self-training teacher's head takes it too


class PPAPNet(nn.Module):
    """ViT (frozen) -> trainable copy of its last block on the second-to-last block's output -> code.

    The same for every backbone family: with DINOv3 the decoder applies the backbone's rotary embedding like the
    block it copies; ``code`` and ``feats`` hold the patch tokens only (no CLS, register or storage tokens)."""

    def __init__(self, backbone: VisionTransformer, dropout: bool = True) -> None:
        super().__init__()
        self.model = backbone
        self.patch_size = backbone.patch_size
        # A copy of the (pretrained) last block, taken after the weights are loaded: the decoder starts
        # exactly where DINO's last block is and learns from there.
        self.decoder = copy.deepcopy(backbone.blocks[-1])
        self.model.requires_grad_(False)
        self.decoder.requires_grad_(True)
        self.project_head = nn.Linear(backbone.embed_dim, backbone.embed_dim)
        # The loss mines positives from these features. The original drops whole channels of them in
        # training mode (Dropout2d, p=0.1), so mining sees a randomly thinned feature space at every step;
        # we keep that, because the released results were trained with it.
        self.dropout = nn.Dropout2d(p=FEATS_DROPOUT) if dropout else nn.Identity()

    @property
    def drops_features(self) -> bool:
        """Whether a forward pass in training mode drops feature channels."""
        return isinstance(self.dropout, nn.Dropout2d)

    def forward(self, img: Tensor, dropout_mask: Optional[Tensor] = None) -> NetOutput:
        """``dropout_mask``: (B, C) multipliers of the feature channels (0, or 1 / (1 - p) for a kept channel)
        to use in training mode instead of drawing them; the training loop draws them for the global batch, so
        that they do not depend on how the batch is split across processes."""
        frozen = self.frozen(img)
        code = self.head(frozen)
        z = F.normalize(self.project_head(code.permute(0, 2, 3, 1).reshape(-1, code.shape[1])), dim=1)
        feats = frozen.feats
        if dropout_mask is not None and self.training and self.drops_features:
            feats = feats * dropout_mask[:, :, None, None].to(feats.dtype)
        else:
            feats = self.dropout(feats)
        return NetOutput(code=code, z=z, feats=feats, frozen=frozen)

    def frozen(self, img: Tensor) -> Frozen:
        """The frozen ViT's part of a forward pass: the input of its last block, and its output as the feature map."""
        height, width = img.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {self.patch_size}")
        rope = self.model.rope(height, width)
        with torch.no_grad():  # the whole ViT is frozen: keep no activations for the backward pass
            x = self.model.prepare_tokens(img)
            for block in self.model.blocks[:-1]:
                x = block(x, rope)
            feats = self.model.norm(self.model.blocks[-1](x, rope))
        grid = (height // self.patch_size, width // self.patch_size)
        return Frozen(tokens=x, rope=rope, feats=_tokens_to_map(feats, *grid, self.model.num_prefix_tokens), grid=grid)

    def head(self, frozen: Frozen, decoder: Optional[nn.Module] = None) -> Tensor:
        """The code (B, C, h, w): ``decoder`` (default this network's; a teacher's copy of it in self-training) on
        the last block's input, then the frozen final norm, whose parameters are frozen but pass gradients on."""
        code = self.model.norm((decoder or self.decoder)(frozen.tokens, frozen.rope))
        return _tokens_to_map(code, *frozen.grid, self.model.num_prefix_tokens)


def dropout_mask(n_images: int, channels: int, generator: torch.Generator, p: float = FEATS_DROPOUT) -> Tensor:
    """(n_images, channels) channel multipliers as ``Dropout2d(p)`` draws them: 0 with probability p, else
    1 / (1 - p); drawn on the CPU from ``generator``."""
    return torch.empty(n_images, channels).bernoulli_(1.0 - p, generator=generator).div_(1.0 - p)


def _tokens_to_map(tokens: Tensor, h: int, w: int, skip: int) -> Tensor:
    """(B, skip + h*w, C) tokens -> (B, C, h, w) map of the patch tokens (the ``skip`` tokens before them dropped)."""
    return tokens[:, skip:].reshape(tokens.shape[0], h, w, -1).permute(0, 3, 1, 2)


def fit_to_patches(img: Tensor, patch_size: int) -> Tensor:
    """``img`` resized (bilinear) to the nearest multiple of ``patch_size`` on each side, if it is not one already:
    evaluation images are 320 x 320, which a patch of 14 does not divide (322 does)."""
    height, width = img.shape[-2:]
    size = [max(patch_size, round(side / patch_size) * patch_size) for side in (height, width)]
    if size == [height, width]:
        return img
    return F.interpolate(img, size=size, mode="bilinear", align_corners=False)


class ClusterOutput(NamedTuple):
    loss: Tensor  # -(probs * inner).sum(1).mean(): minus the mean similarity to the assigned centroid
    probs: Tensor  # (B, K, h, w): one-hot assignment to the most similar centroid
    inner: Tensor  # (B, K, h, w): cosine similarity to each centroid (or the code itself when direct)


class ClusterProbe(nn.Module):
    """Learnable centroids; pixels are assigned to the most similar one (cosine similarity)."""

    def __init__(self, dim: int, n_clusters: int) -> None:
        super().__init__()
        self.clusters = nn.Parameter(torch.randn(n_clusters, dim))

    def forward(self, x: Tensor, is_direct: bool = False) -> ClusterOutput:
        if is_direct:
            inner = x
        else:
            inner = torch.einsum("bchw,nc->bnhw", F.normalize(x, dim=1), F.normalize(self.clusters, dim=1))
        probs = F.one_hot(inner.argmax(1), inner.shape[1]).permute(0, 3, 1, 2).to(inner.dtype)
        return ClusterOutput(loss=-(probs * inner).sum(1).mean(), probs=probs, inner=inner)


def build_model(cfg: ModelConfig, n_classes: int, load_backbone: bool = True) -> tuple[PPAPNet, nn.Conv2d, ClusterProbe]:
    """``(net, linear_probe, cluster_probe)``: the three parts that are trained, checkpointed and evaluated.

    The backbone weights come from ``cfg.pretrained.pretrained_weights``; ``load_backbone=False`` skips that
    for callers that load a whole PPAP checkpoint next (evaluation), so nothing is downloaded.
    """
    pretrained = cfg.pretrained
    backbone = vit(pretrained.model_type, pretrained.dino_patch_size, family=pretrained.name)
    if load_backbone:
        load_backbone_weights(backbone, pretrained)
    net = PPAPNet(backbone, dropout=pretrained.dropout)
    linear_probe = nn.Conv2d(cfg.dim, n_classes, kernel_size=1)
    cluster_probe = ClusterProbe(cfg.dim, n_classes + cfg.extra_clusters)
    return net, linear_probe, cluster_probe
