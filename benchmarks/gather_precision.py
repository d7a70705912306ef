"""What data-parallel training sends per step, and what gathering the frozen features in fp16 or bf16
(``train.gather_feats``) saves and changes.

Traffic: per process and step with K processes, for the paper's geometry (ViT-S/8 at 224 px: a global batch of 64
images of 28 x 28 patches, 384 feature channels, a 384-dimensional code, COCO-Stuff's 27 classes): the all-gather
of z and of the features (each process receives the other processes' rows), the reduce-scatter of z's gradient in
the backward pass, and DDP's all-reduce of the trained parameters' gradients (a ring all-reduce sends and receives
about twice their size times (K - 1) / K).

Decisions: positives and confident negatives mined from real features, with the features as they are and rounded
to fp16 or bf16: how many (anchor, row) decisions change. The features are those of the distilled ViT-tiny/16
fixture (real, if modest, patch semantics; see its README) on CamVid training images at 448 px, so 28 x 28 patches
per image as in the paper's geometry, with 192 channels instead of 384; anchors are drawn as training draws them.

    python benchmarks/gather_precision.py [--images 64] [--json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision.transforms.functional as TF  # noqa: E402
from PIL import Image  # noqa: E402

from loss import PPAPLoss, mine  # noqa: E402
from model import build_model  # noqa: E402
from model.ppap import PPAPNet  # noqa: E402
from model.vit import vit  # noqa: E402
from model.weights import load_backbone_weights  # noqa: E402
from config import BACKBONE_WIDTH, ModelConfig, PretrainedConfig, TrainingCoeff  # noqa: E402
from utils.device import AUTOCAST_DTYPES  # noqa: E402
from dataset.image import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402

SHARED = ROOT.parent / "shared"
PAPER = dict(batch=64, patches=28 * 28, arch="vit_small", patch=8, classes=27)
COEFFS = {"paper (0.55 / 0.2)": TrainingCoeff(initialcrit_pos=0.55, initialcrit_amb=0.2),
          "fixture (0.85 / 0.4)": TrainingCoeff(initialcrit_pos=0.85, initialcrit_amb=0.4)}
RES = 448  # 28 x 28 patches of 16 px
MIB = 2**20


def traffic(processes: int, feats_bytes: int) -> dict[str, float]:
    """MiB one process sends or receives per step, by collective."""
    width = BACKBONE_WIDTH[PAPER["arch"]]
    cfg = ModelConfig(dim=width, pretrained=PretrainedConfig(model_type=PAPER["arch"], dino_patch_size=PAPER["patch"],
                                                             pretrained_weights="none"))
    trained = sum(p.numel() for m in build_model(cfg, PAPER["classes"], load_backbone=False)
                  for p in m.parameters() if p.requires_grad)
    rows, share = PAPER["batch"] * PAPER["patches"], (processes - 1) / processes
    out = {"gather z": share * rows * width * 4, "gather feats": share * rows * width * feats_bytes,
           "z gradient": share * rows * width * 4, "DDP gradients": 2 * share * trained * 4}
    return {k: v / MIB for k, v in out.items()}


def camvid_feats(fixture: Path, images: Path, n: int) -> torch.Tensor:
    backbone = vit("vit_tiny", 16)
    load_backbone_weights(backbone, PretrainedConfig(model_type="vit_tiny", dino_patch_size=16,
                                                     pretrained_weights=str(fixture)))
    net = PPAPNet(backbone, dropout=False).eval()
    files = sorted(images.iterdir())[:n]
    batch = []
    for path in files:
        image = TF.center_crop(TF.resize(Image.open(path).convert("RGB"), RES), RES)
        batch.append(TF.normalize(TF.to_tensor(image), IMAGENET_MEAN, IMAGENET_STD))
    with torch.inference_mode():
        feats = torch.cat([net(torch.stack(batch[i:i + 8])).feats for i in range(0, len(batch), 8)])
    return feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])


def changed_decisions(feats: torch.Tensor, coeff: TrainingCoeff, dtype: torch.dtype) -> dict[str, float]:
    anchors = PPAPLoss(coeff).draw_anchors(feats.shape[0], torch.Generator().manual_seed(0))
    _, size, _ = PPAPLoss(coeff).geometry(feats.shape[0])
    rows = (anchors + torch.arange(anchors.shape[0])[:, None] * size).reshape(-1)
    exact = mine(F.normalize(feats, dim=1), rows, coeff)
    rounded = mine(F.normalize(feats.to(dtype).float(), dim=1), rows, coeff)
    decisions = exact.pos.numel()
    pos_changed = int((exact.pos ^ rounded.pos).sum())
    neg_changed = int((exact.neg ^ rounded.neg).sum())
    return {"decisions": decisions, "positives": int(exact.pos.sum()), "positives changed": pos_changed,
            "negatives": int(exact.neg.sum()), "negatives changed": neg_changed,
            "changed %": 100.0 * int(((exact.pos ^ rounded.pos) | (exact.neg ^ rounded.neg)).sum()) / decisions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=PAPER["batch"], help="CamVid images (one global batch)")
    parser.add_argument("--fixture", type=Path, default=SHARED / "fixtures" / "vit_tiny16_distilled.pth")
    parser.add_argument("--camvid", type=Path, default=SHARED / "camvid")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()

    results = {"traffic MiB per process and step": {
        f"{k} processes, feats {name}": traffic(k, size) for k in (2, 8) for name, size in (("fp32", 4), ("fp16", 2))}}
    feats = camvid_feats(args.fixture, args.camvid / "imgs" / "train", args.images)
    results["changed decisions"] = {f"{name}, {label}": changed_decisions(feats, coeff, dtype)
                                    for label, coeff in COEFFS.items()
                                    for name, dtype in AUTOCAST_DTYPES.items()}
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"traffic per process and step (MiB), paper geometry: batch {PAPER['batch']}, {PAPER['patches']} patches, "
          f"{PAPER['arch']}/{PAPER['patch']}")
    for name, parts in results["traffic MiB per process and step"].items():
        print(f"  {name:28s} " + "  ".join(f"{k} {v:7.1f}" for k, v in parts.items())
              + f"  total {sum(parts.values()):7.1f}")
    print(f"decisions changed by rounding the features ({feats.shape[0]} rows of {feats.shape[1]} channels, "
          f"CamVid, distilled ViT-tiny/16)")
    for name, r in results["changed decisions"].items():
        print(f"  {name:30s} {r['positives changed']:8d} of {r['positives']:9d} positives, "
              f"{r['negatives changed']:8d} of {r['negatives']:9d} negatives: {r['changed %']:.4f}% of "
              f"{r['decisions']} decisions")


if __name__ == "__main__":
    main()
