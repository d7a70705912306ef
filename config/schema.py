"""The options: the original PPAP JSON schema as typed, frozen dataclasses that check their own values
(config/loader.py reads option files into them).

Keys the original code read but never used (``spatial_size``, ``num_neighbors``, ``bn_momentum``,
``projection_type`` ...) are accepted so that original files load unchanged; the README lists them.
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any, Optional, Sequence, get_type_hints

from config.families import BACKBONES
from crf.parameters import BACKENDS as CRF_BACKENDS
from utils.errors import ConfigError

DATA_TYPES = ("cocostuff27", "cocostuff15", "cocostuff3", "cityscapes", "potsdam", "potsdamraw", "directory", "demo")
GATHER_PRECISIONS = ("fp32", "fp16", "bf16")  # train.gather_feats: fp32 is exact; the others halve the traffic
WANDB_MODES = ("online", "offline", "disabled")
TTA_MODES = ("none", "flip")
EVAL_SPLITS = ("val", "test")  # eval.split: the split eval.py and a run's final evaluation report on
# train.label_free_criterion: what chooses label_free.pth at the validations, without labels (engine/criteria.py)
LABEL_FREE_CRITERIA = ("cluster_similarity", "rankme", "ppap_loss", "stability")
# options whose default changed, with the defaults they had: a run started under a former default, which its option
# file did not choose, resumes with it (the value it was started with) instead of being refused
FORMER_DEFAULTS = {("train", "label_free_criterion"): ("cluster_similarity",)}
TEACHERS = ("ema", "fixed", "epoch")  # self_training.teacher (engine/self_training.py)
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


# Field metadata that ``option_keys`` collects. The engine derives from it which options a resumed run may change,
# which ones tell experiments apart and which ones an evaluation depends on, so a new option is classified where it
# is declared.
NO_EFFECT = "no_effect"  # what a run computes stays the same: where files go, what is logged or drawn, worker counts
EVALUATION_INPUT = "evaluation_input"  # an evaluation of a checkpoint depends on every option of this section


def no_effect(default: Any = MISSING, *, default_factory: Any = MISSING) -> Any:
    """A field whose option does not change what a run computes (``NO_EFFECT``)."""
    return field(default=default, default_factory=default_factory, metadata={NO_EFFECT: True})


def evaluation_input(*, default_factory: Any = MISSING) -> Any:
    """A section an evaluation of a checkpoint depends on (``EVALUATION_INPUT``)."""
    return field(default_factory=default_factory, metadata={EVALUATION_INPUT: True})


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
    data_path: str = no_effect()  # where the data is, not what it is (tools.report compares data by fingerprint)
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
    num_workers: int = no_effect(8)

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
    print_freq: int = no_effect(25)  # iterations between printed train lines
    valid_freq: int = 100  # iterations between validations (also at every epoch end)
    epoch: int = 5
    freeze_encoder_bn: bool = False  # read by the original, no effect: the network has no BatchNorm
    freeze_all_bn: int = -1  # read by the original, no effect
    num_accum: int = 1  # gradient accumulation steps
    grad_norm: float = 10.0  # clip the network's gradient norm to this
    gather_feats: str = "fp32"  # ours: the precision of the frozen features the loss gathers from all processes
    label_free_criterion: str = "stability"  # ours: the validation criterion that chooses label_free.pth

    def __post_init__(self) -> None:
        _require(self.gather_feats in GATHER_PRECISIONS, "gather_feats",
                 f"must be one of {', '.join(GATHER_PRECISIONS)} (got {self.gather_feats!r})")
        _choice(self.label_free_criterion, "label_free_criterion", LABEL_FREE_CRITERIA)
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
    n_images: int = no_effect(5)  # images to visualise
    is_crf: bool = True  # also evaluate after dense-CRF refinement
    is_visualize: bool = no_effect(False)
    is_direct: bool = False  # the cluster probe takes the code itself as its inner products
    is_diff: bool = False  # read by the original, unused
    crf_workers: Optional[int] = no_effect(None)  # ours: CRF processes; null = usable cores, 0 = serial in-process
    legacy_extra_cluster_mask: bool = False  # ours: drop predictions >= n_classes, to reproduce the original's numbers
    tta: str = "none"  # ours: "flip" averages the code of the image and of its mirror (STEGO's protocol); PPAP: none
    crf_backend: str = "pydensecrf"  # ours: "torch" refines batches on the evaluation's device, without a pool
    res: int = EVAL_RES  # ours: validation and evaluation crop side; published numbers are at 320 only
    split: str = "val"  # ours: the split evaluations report on; validation, which chooses best.pth, reads val

    def __post_init__(self) -> None:
        _choice(self.tta, "tta", TTA_MODES)
        _choice(self.crf_backend, "crf_backend", CRF_BACKENDS)
        _choice(self.split, "split", EVAL_SPLITS)
        _require(self.extra_clusters >= 0, "extra_clusters", f"must be >= 0 (got {self.extra_clusters})")
        _require(self.n_images >= 0, "n_images", f"must be >= 0 (got {self.n_images})")
        _require(self.crf_workers is None or self.crf_workers >= 0, "crf_workers",
                 f"must be >= 0 or null (got {self.crf_workers})")
        _require(self.res >= 1, "res", f"must be >= 1 pixel (got {self.res})")


@dataclass(frozen=True, kw_only=True)
class SelfTrainingConfig:
    """Ours: the second stage (docs/self_training.md). With ``checkpoint`` set, run.py trains a student, initialised
    from that first-stage checkpoint, on the cluster maps of a teacher; without it nothing of this section is read."""

    checkpoint: Optional[str] = None  # the first stage's checkpoint (label_free.pth, last.pth, best.pth, released)
    teacher: str = "ema"  # ema: the student's moving average; fixed: the first stage; epoch: the student, renewed
    ema_decay: float = 0.99  # teacher "ema": teacher = decay * teacher + (1 - decay) * student, every iteration
    temperature: float = 0.1  # the cluster probe's cosine similarities / temperature: the student's logits
    confidence: float = 0.0  # pixels where the teacher's probability of its cluster is below this are ignored
    crf: Optional[str] = None  # null, or a CRF backend ("pydensecrf", "torch") that refines the teacher's maps
    crf_workers: Optional[int] = no_effect(None)  # the CRF pool's processes; null = usable cores
    tta: bool = False  # the teacher's code averaged with the mirrored code of the mirrored image
    ppap_weight: float = 0.0  # the PPAP loss, times this, beside the cross-entropy (0: not computed)
    focal: float = 0.0  # class weights (1 - the class's share of the batch's pseudo-labels) ** focal; 0: none
    augment: bool = False  # the student sees a blurred, sometimes colour-jittered or grey image; the teacher the image
    masks: Optional[str] = None  # "primaps": each principal mask of the teacher's code takes its majority cluster
    mask_threshold: float = 0.4  # masks "primaps": a mask is the patches of cosine similarity >= this to its seed

    def __post_init__(self) -> None:
        _require(self.checkpoint != "", "checkpoint", "is empty: use null (no second stage) or a checkpoint file")
        _choice(self.teacher, "teacher", TEACHERS)
        _require(0.0 <= self.ema_decay < 1.0, "ema_decay", f"must be in [0, 1) (got {self.ema_decay})")
        _require(self.temperature > 0, "temperature", f"must be > 0 (got {self.temperature})")
        _require(0.0 <= self.confidence < 1.0, "confidence",
                 f"must be a probability in [0, 1) (got {self.confidence}); 0 keeps every pixel")
        _choice(self.crf, "crf", (None, *CRF_BACKENDS))
        _require(self.crf_workers is None or self.crf_workers >= 0, "crf_workers",
                 f"must be >= 0 or null (got {self.crf_workers})")
        _require(self.ppap_weight >= 0, "ppap_weight", f"must be >= 0 (got {self.ppap_weight})")
        _require(self.focal >= 0, "focal", f"must be >= 0 (got {self.focal}); 0 weighs every class alike")
        _choice(self.masks, "masks", (None, "primaps"))
        _require(0.0 < self.mask_threshold <= 1.0, "mask_threshold", f"must be in (0, 1] (got {self.mask_threshold})")


@dataclass(frozen=True, kw_only=True)
class Config:
    gpu_ids: tuple[int, ...] = no_effect((0,))  # device "auto" uses the first one when CUDA is available
    output_dir: str = no_effect("./output/")
    checkpoint: str = no_effect("")  # eval: the checkpoint folder {output_dir}/{checkpoint}/ckpt.pth
    wandb: WandbConfig = no_effect(default_factory=WandbConfig)
    dataset: DatasetConfig = evaluation_input()
    dataloader: DataloaderConfig = field(default_factory=DataloaderConfig)
    training_coeff: TrainingCoeff = field(default_factory=TrainingCoeff)
    model: ModelConfig = evaluation_input(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = evaluation_input(default_factory=EvalConfig)
    self_training: SelfTrainingConfig = field(default_factory=SelfTrainingConfig)
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


def option_keys(tag: str, section: Optional[type] = None, prefix: str = "") -> tuple[str, ...]:
    """The dotted keys of the options whose field metadata carries ``tag`` (``NO_EFFECT``, ``EVALUATION_INPUT``), in
    the schema's order; a tagged section gives ``"name."``, the prefix of every key in it."""
    section = section or Config
    types = get_type_hints(section)
    keys: list[str] = []
    for option in fields(section):
        key, kind = prefix + option.name, types[option.name]
        if option.metadata.get(tag):
            keys.append(key + "." if is_dataclass(kind) else key)
        elif is_dataclass(kind):
            keys += option_keys(tag, kind, key + ".")
    return tuple(keys)
