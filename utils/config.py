"""Option files: the original PPAP JSON schema, loaded into typed, frozen, validated dataclasses.

``load_config(path, overrides)`` reads a JSON option file (optionally extending a ``"base"`` file),
applies dotted command-line overrides (parsed by OmegaConf) and returns a ``Config``. Every mistake
(unknown key, wrong type, impossible value) raises one ``ConfigError`` naming the file and the key.
Loading has no side effects: nothing is written and no environment variable is set.

Keys the original code read but never used (``spatial_size``, ``num_neighbors``, ``bn_momentum``,
``projection_type`` ...) are accepted so that original files load unchanged; the README lists them.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Optional, Sequence, Union, get_args, get_origin, get_type_hints

from omegaconf import OmegaConf

from utils.errors import ConfigError



class Family(NamedTuple):
    """A backbone family (``model.pretrained.name``): the widths of its sizes (``model_type``) and its patch sizes."""

    widths: dict[str, int]
    patch_sizes: tuple[int, ...]
    label: str  # how messages name it


_DINOV2_WIDTHS = {"vit_small": 384, "vit_base": 768, "vit_large": 1024, "vit_giant2": 1536}
BACKBONES = {  # the sizes each family was released in (DINOv3: the hub's vits16, vits16plus, vitb16, vitl16, vith16plus)
    "dino": Family({"vit_tiny": 192, "vit_small": 384, "vit_base": 768}, (8, 16), "DINO"),
    "dinov2": Family(_DINOV2_WIDTHS, (14,), "DINOv2"),
    "dinov2_reg": Family(_DINOV2_WIDTHS, (14,), "DINOv2 with registers"),
    "dinov3": Family({"vit_small": 384, "vit_small_plus": 384, "vit_base": 768, "vit_large": 1024,
                      "vit_huge_plus": 1280}, (16,), "DINOv3"),
}
BACKBONE_WIDTH = BACKBONES["dino"].widths  # DINO's vision_transformer.py
DATA_TYPES = ("cocostuff27", "cocostuff15", "cocostuff3", "cityscapes", "potsdam", "potsdamraw", "directory", "demo")
GATHER_PRECISIONS = ("fp32", "fp16", "bf16")  # train.gather_feats: fp32 is exact; the others halve the traffic
WANDB_MODES = ("online", "offline", "disabled")
TTA_MODES = ("none", "flip")
CRF_BACKENDS = ("pydensecrf", "torch")  # eval.crf_backend
NONE_WEIGHTS = "none"  # model.pretrained.pretrained_weights value for a randomly initialised backbone
EVAL_RES = 320  # eval.res: shorter side to 320 and a centre crop of 320 x 320, as STEGO and PPAP evaluate
BASE_KEY = "base"  # top-level key naming an option file this one extends


class _FieldError(ConfigError):
    """A value rejected by a section's own check; the loader adds the file and the section path."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key} {problem}")
        self.key, self.problem = key, problem


def _require(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise _FieldError(key, problem)


def _choice(value: Any, key: str, choices: Sequence[Any]) -> None:
    _require(value in choices, key, f"must be one of {', '.join(map(repr, choices))} (got {value!r})")


@dataclass(frozen=True, kw_only=True)
class WandbConfig:
    project: str = "PPAP"
    entity: Optional[str] = None
    name: str = "ppap"  # also the run directory: {output_dir}/{name}
    group: Optional[str] = None  # ours: wandb's run group; a sweep's runs are grouped under the sweep's name
    mode: str = "online"  # online | offline | disabled; --debug and --test force disabled
    id: Optional[str] = None  # resume this wandb run id (read by the original's set_wandb)
    notes: Optional[str] = None
    tags: Optional[tuple[str, ...]] = None  # default: [dataset.data_type], so wandb groups runs by dataset
    init_timeout: float = 30.0  # ours: seconds an online run waits for wandb's server before it logs offline

    def __post_init__(self) -> None:
        _choice(self.mode, "mode", WANDB_MODES)
        _require(self.init_timeout > 0, "init_timeout", f"must be > 0 seconds (got {self.init_timeout})")
        _require(bool(self.name) and "/" not in self.name and self.name not in (".", ".."), "name",
                 f"must be a folder name without '/' (it names the run directory; got {self.name!r})")


@dataclass(frozen=True, kw_only=True)
class DatasetConfig:
    data_type: str  # one of DATA_TYPES
    data_path: str
    loader_crop_type: Optional[str] = "center"  # center | random | null: crop of the training loader
    crop_type: Optional[str] = "five"  # five | null: train on the pre-cropped five-crop set
    crop_ratio: float = 0.5  # side of each five-crop, as a fraction of the image side
    res: int = 224  # training resolution
    num_neighbors: int = 7  # read by the original, unused by PPAP
    n_classes: Optional[int] = None  # ours: class count of a 'directory' dataset
    class_names: Optional[tuple[str, ...]] = None  # ours: names of a 'directory' dataset's classes

    def __post_init__(self) -> None:
        _choice(self.data_type, "data_type", DATA_TYPES)
        _require(bool(self.data_path), "data_path", "must name a folder")
        _choice(self.loader_crop_type, "loader_crop_type", ("center", "random", None))
        _choice(self.crop_type, "crop_type", ("five", None))
        _require(0.0 < self.crop_ratio <= 1.0, "crop_ratio", f"must be in (0, 1] (got {self.crop_ratio})")
        _require(self.res > 0, "res", f"must be > 0 (got {self.res})")
        _require(self.num_neighbors >= 0, "num_neighbors", f"must be >= 0 (got {self.num_neighbors})")
        if self.data_type == "directory":
            _require(self.n_classes is not None and self.n_classes >= 1, "n_classes",
                     "must be set to the number of label classes (>= 1) for data_type 'directory'")
            _require(self.class_names is None or len(self.class_names) == self.n_classes, "class_names",
                     f"must list n_classes ({self.n_classes}) names (got {len(self.class_names or ())})")
        else:
            for key in ("n_classes", "class_names"):
                _require(getattr(self, key) is None, key,
                         f"is only read for data_type 'directory'; {self.data_type} has fixed classes")


@dataclass(frozen=True, kw_only=True)
class DataloaderConfig:
    batch_size: int = 64
    num_workers: int = 8

    def __post_init__(self) -> None:
        _require(self.batch_size >= 1, "batch_size", f"must be >= 1 (got {self.batch_size})")
        _require(self.num_workers >= 0, "num_workers", f"must be >= 0 (got {self.num_workers})")


@dataclass(frozen=True, kw_only=True)
class TrainingCoeff:
    initialcrit_pos: float = 0.55  # Phi_0: initial positiveness boundary (cosine similarity)
    initialcrit_amb: float = 0.2  # Psi_0: initial ambiguity boundary; below it a row is a confident negative
    trainpatchsplit: int = 16  # anchors per block = split // trainpatchsplit
    tau: float = 0.8  # temperature of the contrastive logits
    prop_iter: int = 2  # proxy relocation steps (T in the paper)
    sigma_pos: float = 3.0  # Phi decreases by (1 - cos(old proxy, new proxy)) / sigma_pos per step
    sigma_amb: float = 3.0  # Psi increases by (1 - cos(old proxy, new proxy)) / sigma_amb per step
    base_tau: float = 0.07  # ours: the original's hidden base temperature; the loss is scaled by tau / base_tau
    split: int = 784  # ours: rows per anchor block, the original's constant (28 x 28 patches, one image)

    def __post_init__(self) -> None:
        for key in ("initialcrit_pos", "initialcrit_amb"):
            value = getattr(self, key)
            _require(-1.0 <= value <= 1.0, key, f"must be a cosine similarity in [-1, 1] (got {value})")
        _require(self.initialcrit_amb <= self.initialcrit_pos, "initialcrit_amb",
                 f"({self.initialcrit_amb}) must not exceed initialcrit_pos ({self.initialcrit_pos})")
        _require(self.trainpatchsplit >= 1, "trainpatchsplit", f"must be >= 1 (got {self.trainpatchsplit})")
        _require(self.prop_iter >= 0, "prop_iter", f"must be >= 0 (got {self.prop_iter})")
        for key in ("tau", "sigma_pos", "sigma_amb", "base_tau"):
            value = getattr(self, key)
            _require(value > 0, key, f"must be > 0 (got {value})")
        _require(self.split >= 1, "split", f"must be >= 1 (got {self.split})")


@dataclass(frozen=True, kw_only=True)
class PretrainedConfig:
    name: str = "dino"  # the backbone family: dino | dinov2 | dinov2_reg | dinov3
    model_type: str = "vit_small"  # a size of the family: vit_tiny | vit_small | vit_base for DINO, ...
    dino_patch_size: int = 8  # the family's patch: 8 | 16 for DINO, 14 for DINOv2, 16 for DINOv3
    dino_feat_type: str = "feat"  # only "feat" (the original reads nothing else)
    pretrained_weights: Optional[str] = None  # null: the official download; a path; or "none": random
    projection_type: str = "nonlinear"  # read by the original, unused: the projection is one Linear layer
    dropout: bool = True  # Dropout2d(0.1) on the frozen features the loss mines positives from

    def __post_init__(self) -> None:
        _choice(self.name, "name", tuple(BACKBONES))
        family = BACKBONES[self.name]
        _require(self.model_type in family.widths, "model_type",
                 f"must be one of {', '.join(map(repr, family.widths))} for {family.label} (name "
                 f"{self.name!r}; got {self.model_type!r})")
        _require(self.dino_patch_size in family.patch_sizes, "dino_patch_size",
                 f"must be {' or '.join(map(str, family.patch_sizes))} for {family.label} (name {self.name!r}; "
                 f"got {self.dino_patch_size})")
        _choice(self.dino_feat_type, "dino_feat_type", ("feat",))
        _require(self.pretrained_weights != "", "pretrained_weights",
                 "is empty: use null (official weights), a file path, or \"none\" (random backbone)")

    @property
    def width(self) -> int:
        return BACKBONES[self.name].widths[self.model_type]

    @property
    def description(self) -> str:
        """How messages name the backbone: "DINOv2 vit_small/14"."""
        return f"{BACKBONES[self.name].label} {self.model_type}/{self.dino_patch_size}"


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    spatial_size: int = 28  # read by the original, unused
    name: str = "STEGO"  # the original's model family name; must contain "stego"
    arch: str = "dino"  # only "dino"; the ViT itself is pretrained.model_type
    continuous: bool = True  # must be true: the original fails with false too
    dim: int = 384  # must equal the backbone width
    extra_clusters: int = 0  # cluster probe centroids beyond the class count
    bn_momentum: Optional[float] = None  # read by the original, unused: the network has no BatchNorm
    bn_eps: Optional[float] = None  # read by the original, unused
    pretrained: PretrainedConfig = field(default_factory=PretrainedConfig)

    def __post_init__(self) -> None:
        _require("stego" in self.name.lower(), "name", f"must name the STEGO model family, e.g. \"STEGO\" (got {self.name!r})")
        _choice(self.arch, "arch", ("dino",))
        _require(self.continuous, "continuous", "must be true (PPAP trains a continuous code)")
        _require(self.dim == self.pretrained.width, "dim",
                 f"({self.dim}) must equal the width of {self.pretrained.description} ({self.pretrained.width})")
        _require(self.extra_clusters >= 0, "extra_clusters", f"must be >= 0 (got {self.extra_clusters})")


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    name: str = "adam"  # adam | adamw for the network; the probes take adam, the only one the original gave them
    lr: float = 1e-3
    weight_decay: float = 0.0  # used by adamw only

    def __post_init__(self) -> None:
        _choice(self.name, "name", ("adam", "adamw"))
        _require(self.lr >= 0, "lr", f"must be >= 0 (got {self.lr})")
        _require(self.weight_decay >= 0, "weight_decay", f"must be >= 0 (got {self.weight_decay})")
        _require(self.name == "adamw" or self.weight_decay == 0, "weight_decay",
                 f"({self.weight_decay}) is only applied by adamw (the original silently ignored it for adam)")


@dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    net: OptimConfig = field(default_factory=OptimConfig)
    linear: OptimConfig = field(default_factory=OptimConfig)
    cluster: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        _choice(self.linear.name, "linear.name", ("adam",))
        _choice(self.cluster.name, "cluster.name", ("adam",))


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    print_freq: int = 25  # iterations between printed train lines
    valid_freq: int = 100  # iterations between validations (also at every epoch end)
    epoch: int = 5
    freeze_encoder_bn: bool = False  # read by the original, no effect: the network has no BatchNorm
    freeze_all_bn: int = -1  # read by the original, no effect
    num_accum: int = 1  # gradient accumulation steps
    grad_norm: float = 10.0  # clip the network's gradient norm to this
    gather_feats: str = "fp32"  # ours: the precision of the frozen features the loss gathers from all processes

    def __post_init__(self) -> None:
        _require(self.gather_feats in GATHER_PRECISIONS, "gather_feats",
                 f"must be one of {', '.join(GATHER_PRECISIONS)} (got {self.gather_feats!r})")
        for key in ("print_freq", "valid_freq", "epoch", "num_accum"):
            value = getattr(self, key)
            _require(value >= 1, key, f"must be >= 1 (got {value})")
        _require(self.grad_norm > 0, "grad_norm", f"must be > 0 (got {self.grad_norm})")
        _require(self.valid_freq % self.num_accum == 0, "valid_freq",
                 f"({self.valid_freq}) must be a multiple of num_accum ({self.num_accum}), so that validations and "
                 f"checkpoints fall between optimizer steps")


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    extra_clusters: int = 0  # must equal model.extra_clusters
    n_images: int = 5  # images to visualise
    is_crf: bool = True  # also evaluate after dense-CRF refinement
    is_visualize: bool = False
    is_direct: bool = False  # the cluster probe takes the code itself as its inner products
    is_diff: bool = False  # read by the original, unused
    crf_workers: Optional[int] = None  # ours: CRF processes; null = usable cores, 0 = serial in-process
    legacy_extra_cluster_mask: bool = False  # ours: drop predictions >= n_classes, to reproduce the original's numbers
    tta: str = "none"  # ours: "flip" averages the code of the image and of its mirror (STEGO's protocol); PPAP: none
    crf_backend: str = "pydensecrf"  # ours: "torch" refines batches on the evaluation's device, without a pool
    res: int = EVAL_RES  # ours: validation and evaluation crop side; published numbers are at 320 only

    def __post_init__(self) -> None:
        _choice(self.tta, "tta", TTA_MODES)
        _choice(self.crf_backend, "crf_backend", CRF_BACKENDS)
        _require(self.extra_clusters >= 0, "extra_clusters", f"must be >= 0 (got {self.extra_clusters})")
        _require(self.n_images >= 0, "n_images", f"must be >= 0 (got {self.n_images})")
        _require(self.crf_workers is None or self.crf_workers >= 0, "crf_workers",
                 f"must be >= 0 or null (got {self.crf_workers})")
        _require(self.res >= 1, "res", f"must be >= 1 pixel (got {self.res})")


@dataclass(frozen=True, kw_only=True)
class Config:
    gpu_ids: tuple[int, ...] = (0,)  # device "auto" uses the first one when CUDA is available
    output_dir: str = "./output/"
    checkpoint: str = ""  # eval: the checkpoint folder {output_dir}/{checkpoint}/ckpt.pth
    wandb: WandbConfig = field(default_factory=WandbConfig)
    dataset: DatasetConfig
    dataloader: DataloaderConfig = field(default_factory=DataloaderConfig)
    training_coeff: TrainingCoeff = field(default_factory=TrainingCoeff)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0  # ours: seeds torch, numpy, random and the data-loader workers
    device: str = "auto"  # ours: auto | cpu | cuda | cuda:N
    precision: str = "auto"  # ours: auto (fp16 on CUDA, fp32 on CPU) | fp32 | fp16 | bf16
    deterministic: bool = False  # ours: deterministic kernels, so that a GPU run repeats bit for bit

    def __post_init__(self) -> None:
        _require(all(i >= 0 for i in self.gpu_ids), "gpu_ids", f"must be GPU indices >= 0 (got {list(self.gpu_ids)})")
        _require(0 <= self.seed < 2**32, "seed", f"must be in [0, 2**32) (numpy's seeds; got {self.seed})")
        device = self.device
        _require(device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit()),
                 "device", f"must be auto, cpu, cuda or cuda:N (got {device!r})")
        _choice(self.precision, "precision", ("auto", "fp32", "fp16", "bf16"))
        _require(self.eval.extra_clusters == self.model.extra_clusters, "eval.extra_clusters",
                 f"({self.eval.extra_clusters}) must equal model.extra_clusters ({self.model.extra_clusters})")
        patch = self.model.pretrained.dino_patch_size
        _require(self.dataset.res % patch == 0, "dataset.res",
                 f"({self.dataset.res}) must be a multiple of model.pretrained.dino_patch_size ({patch})")


def load_config(path: Union[str, Path], overrides: Sequence[Union[str, tuple[str, Any]]] = ()) -> Config:
    """Read an option file, apply overrides and validate.

    ``overrides`` holds ``"dotted.key=value"`` strings (values parsed by OmegaConf: numbers, true/false,
    null, lists) or ``(dotted.key, value)`` pairs whose value is taken as it is.
    """
    raw, owners = _read_with_bases(Path(path), chain=())
    return config_from_dict(raw, source=str(path), overrides=overrides, owners=owners)


def config_from_dict(raw: Mapping[str, Any], source: str, overrides: Sequence[Union[str, tuple[str, Any]]] = (),
                     owners: Optional[Mapping[str, str]] = None) -> Config:
    """Build a validated ``Config`` from a plain dict (an option file's content or a saved resolved config) and
    ``overrides`` (as ``load_config`` takes them). A message about a value names where it came from: the override
    that set it, else the file that set it (``owners``: dotted key -> file, for option files with bases), else
    ``source``."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: expected a JSON object at the top level, got {type(raw).__name__}")
    raw, origins = _apply_overrides(raw, overrides)
    return _build(Config, raw, prefix="", source=_Source(source, {**(owners or {}), **origins}))


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The resolved config as plain JSON types; ``config_from_dict`` turns it back into the same ``Config``."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


@dataclass(frozen=True)
class _Source:
    """Where the options come from: a file (or checkpoint), except the keys that base files or overrides set."""

    name: str
    origins: Mapping[str, str]  # dotted key -> the base file or the override that set it, as messages show it

    def of(self, key: str) -> str:
        """Where ``key`` (an item ``key[i]`` of a list: where the list; a section: its first key) was set."""
        for whole in (key, key.split("[", 1)[0]):
            if whole in self.origins:
                return self.origins[whole]
        return next((origin for k, origin in self.origins.items() if k.startswith(key + ".")), self.name)


def _apply_overrides(raw: Mapping[str, Any],
                     overrides: Sequence[Union[str, tuple[str, Any]]]) -> tuple[dict[str, Any], dict[str, str]]:
    """``raw`` with each dotted-key override set, and which override set which key; unknown keys raise."""
    merged, origins = json.loads(json.dumps(raw)), {}
    for item in overrides:
        if isinstance(item, str):
            key, value = _parse_override(item)
            shown = f"command-line override {item!r}"
        else:
            key, value = item
            shown = f"override {key}={value!r}"
        _check_key_path(key, shown)
        node = merged
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = value
        origins[key] = shown
    return merged, origins


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"command-line override {item!r}: expected dotted.key=value, e.g. train.epoch=1")
    if not text.strip():  # OmegaConf reads "key=" as null, which for some keys means something (a download)
        raise ConfigError(f"command-line override {item!r} gives no value: write {key.strip()}=null for null, or "
                          f"{key.strip()}=\"''\" for an empty string")
    try:
        parsed = OmegaConf.to_container(OmegaConf.from_dotlist([item]), resolve=False)
    except Exception as err:  # OmegaConf and YAML parser errors share no base class
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"command-line override {item!r}: cannot parse the value ({first_line})") from None
    for part in key.strip().split("."):
        parsed = parsed[part]
    return key.strip(), parsed


def _check_key_path(key: str, shown: str) -> None:
    cls: Any = Config
    walked = []
    for part in key.split("."):
        if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
            raise ConfigError(f"{shown}: {'.'.join(walked)} is a value, not a section")
        names = {f.name: f for f in dataclasses.fields(cls)}
        if part not in names:
            where = ".".join(walked + [part])
            raise ConfigError(f"{shown}: unknown key {where}{_suggest(part, names, walked)}")
        walked.append(part)
        cls = get_type_hints(cls)[part]


def _read_with_bases(path: Path, chain: tuple[Path, ...]) -> tuple[dict[str, Any], dict[str, str]]:
    """The option file merged over its base files, and for each dotted key the file that set it."""
    raw = _read_json(path)
    base = raw.pop(BASE_KEY, None)
    owners = dict.fromkeys(_dotted_keys(raw), str(path))
    if base is None:
        return raw, owners
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: \"{BASE_KEY}\" must name another option file (got {base!r})")
    base_path = (path.parent / base) if not Path(base).is_absolute() else Path(base)
    resolved = base_path.resolve()
    if resolved in chain or resolved == path.resolve():
        raise ConfigError(f"{path}: \"{BASE_KEY}\": {base} extends itself through a cycle of base files")
    if not base_path.exists():
        raise ConfigError(f"{path}: \"{BASE_KEY}\": {base} not found (looked for {base_path}; a relative base is "
                          f"read from the folder of the file that names it)")
    parent, parent_owners = _read_with_bases(base_path, chain + (path.resolve(),))
    merged = OmegaConf.merge(OmegaConf.create(parent), OmegaConf.create(raw))
    return OmegaConf.to_container(merged, resolve=False), {**parent_owners, **owners}


def _dotted_keys(raw: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in raw.items():
        keys += _dotted_keys(value, f"{prefix}{key}.") if isinstance(value, Mapping) else [f"{prefix}{key}"]
    return keys


def _read_json(path: Path) -> dict[str, Any]:
    """An option file's JSON object; ``path`` may also be a pipe (``--opt <(...)``) or a device such as /dev/stdin."""
    if path.is_dir():
        raise ConfigError(f"option file {path} is a folder; pass a JSON file with --opt")
    if not path.exists():
        raise ConfigError(f"option file {path} not found (pass an existing JSON file with --opt)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"option file {path}: cannot read it ({err.strerror})") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    return data


def _suggest(name: str, choices: Mapping[str, Any], walked: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    if close:
        return f" (did you mean {'.'.join([*walked, close[0]])}?)"
    return f" (known keys: {', '.join(choices)})"


def _build(cls: type, raw: Mapping[str, Any], prefix: str, source: _Source) -> Any:
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    walked = prefix.rstrip(".").split(".") if prefix else []
    for key in raw:
        if key not in fields:
            raise ConfigError(f"{source.of(prefix + key)}: unknown key {prefix}{key}{_suggest(key, fields, walked)}")
    values = {}
    for name, f in fields.items():
        if name in raw:
            values[name] = _convert(raw[name], hints[name], f"{prefix}{name}", source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source.name}: missing key {prefix}{name}")
    try:
        return cls(**values)
    except _FieldError as err:
        raise ConfigError(f"{source.of(prefix + err.key)}: {prefix}{err.key} {err.problem}") from None


def _convert(value: Any, tp: Any, key: str, source: _Source) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner, key, source)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source.of(key)}: {key} must be a JSON object (got {_shown(value)})")
        return _build(tp, value, f"{key}.", source)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source.of(key)}: {key} must be a list (got {_shown(value)})")
        return tuple(_convert(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source.of(key)}: {key} must be true or false (got {_shown(value)})")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{source.of(key)}: {key} must be an integer (got {_shown(value)})")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value) if abs(value) < 1e308 or isinstance(value, float) else math.inf
            if math.isfinite(number):
                return number
        raise ConfigError(f"{source.of(key)}: {key} must be a finite number (got {_shown(value)})")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{source.of(key)}: {key} must be a string (got {_shown(value)})")
    raise TypeError(f"config field {key} has an unsupported type {tp!r}")


def _shown(value: Any) -> str:
    if value is None:
        return "null"
    shown = json.dumps(value) if isinstance(value, (str, list, dict)) else repr(value)
    return f"{type(value).__name__} {shown}"
