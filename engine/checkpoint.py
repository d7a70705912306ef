"""PPAP checkpoints: what one holds, and reading one back into the model (utils/files.py writes and reads files).

Keys of the released checkpoints (and of the original's save_checkpoint): ``net_model_state_dict``,
``linear_model_state_dict``, ``cluster_model_state_dict``, ``net_optimizer_state_dict``,
``linear_optimizer_state_dict``, ``cluster_optimizer_state_dict`` (None in the released files), ``epoch``, ``iter``,
``best_epoch``, ``best_iter`` and ``best``. Ours fill those keys and add what an exact resume and a model rebuilt
from the checkpoint alone need: the fp16 loss-scaler state, the random-number-generator states, the data-loader
position, the wandb run id and the resolved config.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch
from torch import Tensor, nn

from model import ClusterProbe, PPAPNet, build_model
from model.weights import describe_vit_state_dict, description_of, load_state_dict_exactly
from config import ModelConfig
from utils.errors import WeightsError
from utils.files import describe_contents, read_torch_file

RELEASED_KEYS = ("net_model_state_dict", "linear_model_state_dict", "cluster_model_state_dict")
OPTIMIZER_KEYS = ("net_optimizer_state_dict", "linear_optimizer_state_dict", "cluster_optimizer_state_dict")
# Checkpoints without this key are released (or hand-made) files: they evaluate, but hold no training state.
FORMAT_VERSION = 1
TRAINING_STATE_KEYS = OPTIMIZER_KEYS + ("rng_state", "batch_in_epoch", "config")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a PPAP checkpoint (ours or a released one) on the CPU; refuse anything without the released keys."""
    ckpt = read_torch_file(path, "checkpoint")
    if not isinstance(ckpt, Mapping) or not all(k in ckpt for k in RELEASED_KEYS):
        backbone = describe_vit_state_dict(ckpt) if isinstance(ckpt, Mapping) else None
        hint = (f"; these are the weights of a {backbone} backbone: give them to model.pretrained.pretrained_weights"
                if backbone else f"; a PPAP checkpoint holds {', '.join(RELEASED_KEYS)}")
        held = describe_contents(ckpt, "a PPAP checkpoint's")
        raise WeightsError(f"checkpoint {path} is not a PPAP checkpoint: it holds {held}{hint}")
    return dict(ckpt)


def require_training_state(ckpt: Mapping[str, Any], source: str) -> None:
    """Refuse to resume from a checkpoint that holds only weights (a released file, or one of another version)."""
    if ckpt.get("format_version") != FORMAT_VERSION or any(ckpt.get(k) is None for k in TRAINING_STATE_KEYS):
        raise WeightsError(f"--resume: {source} holds no training state of this version (format "
                           f"{ckpt.get('format_version')}, expected {FORMAT_VERSION}); it can be evaluated with "
                           f"eval.py --checkpoint {source}, but a run cannot continue from it")


def training_checkpoint(net: nn.Module, linear: nn.Module, cluster: nn.Module,
                        optimizers: Mapping[str, torch.optim.Optimizer], scaler: Mapping[str, Any],
                        progress: Mapping[str, Any], config: Mapping[str, Any],
                        wandb_run_id: Optional[str]) -> dict[str, Any]:
    """Everything a checkpoint of a run holds. ``optimizers``: {"net": ..., "linear": ..., "cluster": ...};
    ``progress``: the released keys epoch, iter, best_epoch, best_iter, best, and batch_in_epoch."""
    return {
        **progress,
        "net_model_state_dict": _cpu(net.state_dict()),
        "linear_model_state_dict": _cpu(linear.state_dict()),
        "cluster_model_state_dict": _cpu(cluster.state_dict()),
        **{f"{name}_optimizer_state_dict": optimizer.state_dict() for name, optimizer in optimizers.items()},
        "scaler_state_dict": dict(scaler),
        "rng_state": rng_state(),
        "wandb_run_id": wandb_run_id,
        "config": dict(config),
        "format_version": FORMAT_VERSION,
    }


def _cpu(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().cpu() for k, v in state.items()}


def rng_state() -> dict[str, Any]:
    """Every random stream training draws from, in types ``torch.load(weights_only=True)`` accepts."""
    numpy_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(numpy_state[1].astype(np.int64)), "pos": int(numpy_state[2]),
                  "has_gauss": int(numpy_state[3]), "cached_gaussian": float(numpy_state[4])},
        "python": random.getstate(),
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def check_fits(ckpt: Mapping[str, Any], cfg: ModelConfig, n_classes: int, source: str) -> None:
    """Refuse a checkpoint whose backbone, probes or class count differ from the option file, naming what differs."""
    net = ckpt["net_model_state_dict"]
    wanted = description_of(cfg.pretrained)
    backbone = {k[len("model."):]: v for k, v in net.items() if k.startswith("model.")}
    found = describe_vit_state_dict(backbone)
    if found is not None and found != wanted:
        raise WeightsError(f"{source}: the checkpoint holds a {found} backbone; the options ask for a {wanted} "
                           f"(model.pretrained.name / model_type / dino_patch_size)")
    clusters = ckpt["cluster_model_state_dict"].get("clusters")
    n_clusters = n_classes + cfg.extra_clusters
    if clusters is not None and tuple(clusters.shape) != (n_clusters, cfg.dim):
        raise WeightsError(
            f"{source}: the checkpoint has {clusters.shape[0]} cluster centroids of width {clusters.shape[1]}; the "
            f"options ask for {n_clusters} ({n_classes} classes + {cfg.extra_clusters} extra_clusters) of width "
            f"{cfg.dim} ({cfg.pretrained.model_type})")
    weight = ckpt["linear_model_state_dict"].get("weight")
    if weight is not None and tuple(weight.shape[:2]) != (n_classes, cfg.dim):
        raise WeightsError(f"{source}: the checkpoint's linear probe has {weight.shape[0]} classes of width "
                           f"{weight.shape[1]}; the dataset has {n_classes} classes and the options width {cfg.dim}")


def networks_from_checkpoint(ckpt: Mapping[str, Any], cfg: ModelConfig, n_classes: int,
                             source: str) -> tuple[PPAPNet, nn.Conv2d, ClusterProbe]:
    """The model of the option file with every weight from the checkpoint (strict), nothing downloaded."""
    check_fits(ckpt, cfg, n_classes, source)
    net, linear, cluster = build_model(cfg, n_classes, load_backbone=False)
    load_networks(ckpt, net, linear, cluster, source)
    return net, linear, cluster


def load_networks(ckpt: Mapping[str, Any], net: nn.Module, linear: nn.Module, cluster: nn.Module, source: str) -> None:
    load_state_dict_exactly(net, ckpt["net_model_state_dict"], f"{source} (net_model_state_dict)")
    load_state_dict_exactly(linear, ckpt["linear_model_state_dict"], f"{source} (linear_model_state_dict)")
    load_state_dict_exactly(cluster, ckpt["cluster_model_state_dict"], f"{source} (cluster_model_state_dict)")


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose value differs between two resolved configs (as ``config_to_dict`` writes them)."""
    keys = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys
