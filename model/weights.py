"""Backbone weights: the official DINO and DINOv2 downloads (the families' table, config/families.py, names the files),
local files in every format we know, or a random start.

Every state dict is loaded with strict=True after an explicit comparison of keys and shapes, so a file that
does not fit is an error that says what differs (and, for a file of another family or size, what it looks like),
never a silently random backbone. DINOv3's weights are distributed only after accepting its licence: they come
from a local file.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn

from utils.files import describe_contents, listed, read_torch_file
from config import BACKBONES, NONE_WEIGHTS, PretrainedConfig
from utils.errors import WeightsError

log = logging.getLogger(__name__)

DINO_BASE_URL = BACKBONES["dino"].weights_url
DINOV3_DOWNLOADS = BACKBONES["dinov3"].weights_page
UNUSED_KEYS = ("local_cls_norm.",)  # DINOv3's satellite ViT-L: a norm of its pretraining's local crops only
DDP_PREFIX, BACKBONE_PREFIX = "module.", "backbone."  # training checkpoints: DDP, and the ViT beside its heads
TRAINING_ONLY_PREFIX = "head."  # the DINO projection head, not part of the backbone
PPAP_BACKBONE_PREFIX = "model."  # where a PPAP checkpoint's net_model_state_dict keeps the ViT


def release_url(name: str, model_type: str, patch_size: int) -> str:
    """Where the official weights of a family's ``model_type`` and patch size are downloaded from."""
    family = BACKBONES[name]
    file = family.weights.get((model_type, patch_size))
    if file is None:
        raise WeightsError(
            f"there is no official {family.label} release for {model_type}/{patch_size}; set "
            f"model.pretrained.pretrained_weights to a local weight file (or \"{NONE_WEIGHTS}\" for a random backbone)")
    if family.weights_url is None:
        raise WeightsError(
            f"{family.label} weights are distributed only after accepting Meta's {family.label} licence, so they are "
            f"not downloaded here: request them at {family.weights_page}, download {file} and pass it with "
            f"model.pretrained.pretrained_weights=/path/to/{file}")
    return family.weights_url + file


def dino_url(model_type: str, patch_size: int) -> str:
    """Where DINO's official ``model_type`` / ``patch_size`` is downloaded from."""
    return release_url("dino", model_type, patch_size)


def official_url(pretrained: PretrainedConfig) -> str:
    """Where the official weights of the configured backbone are downloaded from (DINO, DINOv2)."""
    return release_url(pretrained.name, pretrained.model_type, pretrained.dino_patch_size)


def load_backbone_weights(vit: nn.Module, pretrained: PretrainedConfig) -> str:
    """Fill ``vit`` according to ``model.pretrained`` (its ``pretrained_weights``); returns a description of the
    source."""
    weights, wanted = pretrained.pretrained_weights, pretrained.description
    if weights == NONE_WEIGHTS:
        log.warning("model.pretrained.pretrained_weights is \"none\": the %s backbone is RANDOMLY initialised. "
                    "Its features carry no semantics; use this for smoke tests only.", wanted)
        return "random initialisation"
    if weights is None:
        source = official_url(pretrained)
        state_dict = _download(source, BACKBONES[pretrained.name].label)
    else:
        state_dict = read_torch_file(weights, "weight file")
        source = weights
    backbone = extract_backbone_state_dict(state_dict, source)
    if not backbone.keys() & vit.state_dict().keys():
        raise _no_vit_weights(source, state_dict)
    load_state_dict_exactly(vit, backbone, source, expected=description_of(pretrained))
    return source


def _download(url: str, family: str) -> dict[str, Tensor]:
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=True)
    except Exception as err:  # network errors come from urllib, http and ssl alike
        raise WeightsError(
            f"could not download the {family} weights from {url} ({type(err).__name__}: {err}). Download the file "
            f"elsewhere and pass it with model.pretrained.pretrained_weights=/path/to/file.pth"
        ) from None


def extract_backbone_state_dict(obj: Any, source: str) -> dict[str, Tensor]:
    """The ViT's state dict from any of the formats we accept.

    - a released DINO backbone: a plain state dict with the ViT's keys;
    - a training checkpoint of DINO, DINOv2 or DINOv3: ``obj["teacher"]``, the ViT's keys prefixed ``backbone.``
      (and ``module.``) beside its heads' (``head.*``, ``dino_head.*``, ``ibot_head.*``);
    - a PPAP checkpoint: ``obj["net_model_state_dict"]``, the ViT under ``model.*``.
    """
    if not isinstance(obj, Mapping):
        raise _no_vit_weights(source, obj)
    if "teacher" in obj:
        obj = obj["teacher"]
    elif "net_model_state_dict" in obj:
        net = obj["net_model_state_dict"]
        obj = {k[len(PPAP_BACKBONE_PREFIX):]: v for k, v in net.items() if k.startswith(PPAP_BACKBONE_PREFIX)}
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise _no_vit_weights(source, obj)
    wrapped = any(key.removeprefix(DDP_PREFIX).startswith(BACKBONE_PREFIX) for key in obj)
    state_dict = {}
    for key, value in obj.items():
        key = key.removeprefix(DDP_PREFIX)
        if wrapped:  # a training checkpoint: the backbone's keys, not its heads' (DINO's head, DINOv2/v3's dino_head ...)
            if not key.startswith(BACKBONE_PREFIX):
                continue
            key = key[len(BACKBONE_PREFIX):]
        if not key.startswith((TRAINING_ONLY_PREFIX, *UNUSED_KEYS)):
            state_dict[key] = value
    return state_dict


def _no_vit_weights(source: str, obj: Any) -> WeightsError:
    held = describe_contents(obj, "a ViT's")
    return WeightsError(f"weight file {source} holds no ViT weights: it holds {held}")


def describe_vit_state_dict(state_dict: Mapping[str, Tensor]) -> Optional[str]:
    """'DINOv2 vit_small/14 with 4 registers'-style name of the ViT a state dict holds, when its keys and shapes say
    so (the family from its characteristic keys, the size from its width, depth and feed-forward layer)."""
    proj = state_dict.get("patch_embed.proj.weight")
    if not isinstance(proj, Tensor) or proj.ndim != 4:
        return None
    width, patch = proj.shape[0], proj.shape[-1]
    if "rope_embed.periods" in state_dict or "storage_tokens" in state_dict:
        family, extra = "dinov3", ""
    elif "register_tokens" in state_dict:
        family, extra = "dinov2_reg", f" with {state_dict['register_tokens'].shape[1]} registers"
    elif "blocks.0.ls1.gamma" in state_dict or "mask_token" in state_dict:
        family, extra = "dinov2", ""
    else:
        family, extra = "dino", ""
    swiglu = any(k.startswith("blocks.0.mlp.w") for k in state_dict)
    sizes = [name for name, w in BACKBONES[family].widths.items()
             if w == width and name.endswith("_plus") == (swiglu and family == "dinov3")]
    label = BACKBONES[family].label.replace(" with registers", "")
    return f"{label} {sizes[0] if sizes else f'ViT of width {width}'}/{patch}{extra}"


def description_of(pretrained: PretrainedConfig) -> str:
    """``describe_vit_state_dict``'s name for the backbone the options ask for."""
    family = BACKBONES[pretrained.name]
    registers = f" with {family.registers} registers" if family.registers else ""
    return f"{family.label.replace(' with registers', '')} {pretrained.model_type}/{pretrained.dino_patch_size}" \
           f"{registers}"


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
            problems.append(f"{len(missing)} missing key(s): {listed(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected key(s): {listed(unexpected)}")
        if shapes:
            problems.append(f"{len(shapes)} shape mismatch(es): {listed(shapes)}")
        found = describe_vit_state_dict(state_dict)
        hint = (f" The file looks like a {found}; the option file asks for a {expected}."
                if found and expected and found != expected else "")
        raise WeightsError(f"{source} does not fit the model: {'; '.join(problems)}.{hint}")
    module.load_state_dict(state_dict, strict=True)
