"""Backbone weights: the official DINO download, local files in every format we know, or a random start.

Every state dict is loaded with strict=True after an explicit comparison of keys and shapes, so a file that
does not fit is an error that says what differs, never a silently random backbone.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn

from utils.files import read_torch_file
from utils.config import BACKBONE_WIDTH, NONE_WEIGHTS
from utils.errors import WeightsError

log = logging.getLogger(__name__)

DINO_BASE_URL = "https://dl.fbaipublicfiles.com/dino/"
DINO_RELEASES = {  # (arch, patch) -> file of the official release, as in DINO's hubconf and the original code
    ("vit_small", 16): "dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth",
    ("vit_small", 8): "dino_deitsmall8_300ep_pretrain/dino_deitsmall8_300ep_pretrain.pth",
    ("vit_base", 16): "dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
    ("vit_base", 8): "dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth",
}
PREFIXES_TO_STRIP = ("module.", "backbone.")  # DINO training checkpoints wrap the ViT in DDP and MultiCropWrapper
TRAINING_ONLY_PREFIX = "head."  # the DINO projection head, not part of the backbone
PPAP_BACKBONE_PREFIX = "model."  # where a PPAP checkpoint's net_model_state_dict keeps the ViT


def dino_url(model_type: str, patch_size: int) -> str:
    try:
        return DINO_BASE_URL + DINO_RELEASES[(model_type, patch_size)]
    except KeyError:
        raise WeightsError(
            f"there is no official DINO release for {model_type}/{patch_size}; set "
            f"model.pretrained.pretrained_weights to a local weight file (or \"{NONE_WEIGHTS}\" for a random backbone)"
        ) from None


def load_backbone_weights(vit: nn.Module, pretrained_weights: Optional[str], model_type: str, patch_size: int) -> str:
    """Fill ``vit`` according to ``model.pretrained.pretrained_weights``; returns a description of the source."""
    if pretrained_weights == NONE_WEIGHTS:
        log.warning("model.pretrained.pretrained_weights is \"none\": the %s/%d backbone is RANDOMLY initialised. "
                    "Its features carry no semantics; use this for smoke tests only.", model_type, patch_size)
        return "random initialisation"
    if pretrained_weights is None:
        url = dino_url(model_type, patch_size)
        state_dict = _download(url)
        source = url
    else:
        state_dict = read_torch_file(pretrained_weights, "weight file")
        source = pretrained_weights
    load_state_dict_exactly(vit, extract_backbone_state_dict(state_dict, source), source,
                            expected=f"{model_type}/{patch_size}")
    return source


def _download(url: str) -> dict[str, Tensor]:
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=True)
    except Exception as err:  # network errors come from urllib, http and ssl alike
        raise WeightsError(
            f"could not download the DINO weights from {url} ({type(err).__name__}: {err}). Download the file "
            f"elsewhere and pass it with model.pretrained.pretrained_weights=/path/to/file.pth"
        ) from None


def extract_backbone_state_dict(obj: Any, source: str) -> dict[str, Tensor]:
    """The ViT's state dict from any of the formats we accept.

    - a released DINO backbone: a plain state dict with the ViT's keys;
    - a DINO training checkpoint: ``obj["teacher"]``, keys prefixed ``module.`` / ``backbone.``, plus ``head.*``;
    - a PPAP checkpoint: ``obj["net_model_state_dict"]``, the ViT under ``model.*``.
    """
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{source}: expected a state dict or a checkpoint dict, got {type(obj).__name__}")
    if "teacher" in obj:
        obj = obj["teacher"]
    elif "net_model_state_dict" in obj:
        net = obj["net_model_state_dict"]
        obj = {k[len(PPAP_BACKBONE_PREFIX):]: v for k, v in net.items() if k.startswith(PPAP_BACKBONE_PREFIX)}
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise WeightsError(f"{source}: not a state dict of tensors (top-level keys: {', '.join(map(str, list(obj)[:8]))})")
    state_dict = {}
    for key, value in obj.items():
        for prefix in PREFIXES_TO_STRIP:
            if key.startswith(prefix):
                key = key[len(prefix):]
        if not key.startswith(TRAINING_ONLY_PREFIX):
            state_dict[key] = value
    return state_dict


def describe_vit_state_dict(state_dict: Mapping[str, Tensor]) -> Optional[str]:
    """'vit_small/8'-style name of the ViT a state dict holds, when its shapes say so."""
    proj = state_dict.get("patch_embed.proj.weight")
    if proj is None or proj.ndim != 4:
        return None
    width, patch = proj.shape[0], proj.shape[-1]
    names = [name for name, w in BACKBONE_WIDTH.items() if w == width]
    return f"{names[0] if names else f'a ViT of width {width}'}/{patch}"


def load_state_dict_exactly(module: nn.Module, state_dict: Mapping[str, Tensor], source: str, expected: str = "") -> None:
    """``module.load_state_dict(state_dict, strict=True)``, with a message that names every difference."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k}: file {list(state_dict[k].shape)} vs model {list(own[k].shape)}"
              for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing key(s): {_listed(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected key(s): {_listed(unexpected)}")
        if shapes:
            problems.append(f"{len(shapes)} shape mismatch(es): {_listed(shapes)}")
        found = describe_vit_state_dict(state_dict)
        hint = f" The file looks like {found}; the option file asks for {expected}." if found and expected and found != expected else ""
        raise WeightsError(f"{source} does not fit the model: {'; '.join(problems)}.{hint}")
    module.load_state_dict(state_dict, strict=True)


def _listed(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
