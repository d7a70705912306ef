"""Training throughput (images/s) of one full PPAP step, with our loss and with a straightforward one, in one run.

Both steps are identical (the network with its frozen trunk under no_grad, the probes, backward, gradient clipping,
three optimizer steps) except for the PPAP loss: ours, or the block-by-block version of benchmarks/loss_bench.py
that materialises the (anchors x N x C) product as the original does. Random weights and random 224 px images: the
speed does not depend on them.

    python benchmarks/train_bench.py --arch vit_tiny --patch 16 --batch 8
    python benchmarks/train_bench.py --arch vit_small --patch 8 --batch 8 --device cuda --precision fp16
    python benchmarks/train_bench.py --family dinov2 --arch vit_small --patch 14 --batch 8
    python benchmarks/train_bench.py --deterministic ...   # instead: ours with and without deterministic: true
    python benchmarks/train_bench.py --second-stage [--crf pydensecrf] [--tta] [--masks primaps] ...   # instead:
        a first-stage and a second-stage step; the dense CRF takes about 3.5 times longer on these random images
        than on a photo (0.56 s against 0.16 s at 224 px), so a run on photos is faster (docs/self_training.md);
        --masks primaps cuts the random code into about one mask per patch (174 of 196) where a trained code has a
        few, so that the CRF refines 175 maps instead of about 5
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.loss_bench import PAPER_COEFF, straightforward_loss  # noqa: E402
from engine.self_training import SelfTraining, Teacher  # noqa: E402
from engine.train import build_optimizers, forward_losses  # noqa: E402
from loss import PPAPLoss, PPAPResult  # noqa: E402
from model import build_model  # noqa: E402
from config import BACKBONES, ModelConfig, OptimizerConfig, PretrainedConfig, SelfTrainingConfig  # noqa: E402
from utils.device import autocast, deterministic_algorithms, grad_scaler  # noqa: E402
from utils.distributed import ONE_PROCESS  # noqa: E402

N_CLASSES = 27  # COCO-Stuff


class StraightforwardPPAP(torch.nn.Module):
    """The straightforward loss behind the PPAPLoss interface, anchors drawn the same way."""

    def forward(self, z, feats, anchors=None, world=None, generator=None):
        feats = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])
        anchors = PPAPLoss(PAPER_COEFF).draw_anchors(z.shape[0])
        loss = straightforward_loss(z.float(), feats.float(), anchors, PAPER_COEFF)
        return PPAPResult(loss=loss, num_pos=loss.new_zeros(()), num_neg=loss.new_zeros(()))


def train_step(modules, optimizers, scaler, loss_fn, img, label, precision: str, world=ONE_PROCESS,
               stream=None, dropout_channels: int = 0, self_training=None) -> None:
    """One iteration of engine/train.py's train_one_epoch, without its logging and checks."""
    net, linear, cluster = modules
    with autocast(img.device, precision):
        terms, _ = forward_losses(net, linear, cluster, loss_fn, img, label, N_CLASSES, world, stream,
                                  dropout_channels, self_training)
    scaler.scale(terms.total * world.size).backward()
    scaler.unscale_(optimizers.net)
    torch.nn.utils.clip_grad_norm_(net.parameters(), 10.0)
    for optimizer in optimizers:
        scaler.step(optimizer)
    scaler.update()
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    if self_training is not None:
        self_training.after_step(net, cluster)


def images_per_second(loss_fn, args, device: torch.device, second_stage: bool = False) -> float:
    torch.manual_seed(0)
    cfg = ModelConfig(dim=BACKBONES[args.family].widths[args.arch], pretrained=PretrainedConfig(
        name=args.family, model_type=args.arch, dino_patch_size=args.patch, pretrained_weights="none"))
    net, linear, cluster = (m.to(device) for m in build_model(cfg, N_CLASSES))
    optimizers = build_optimizers(OptimizerConfig(), net, linear, cluster)
    scaler = grad_scaler(device, args.precision)
    img = torch.randn(args.batch, 3, 224, 224, device=device)
    label = torch.randint(N_CLASSES, (args.batch, 224, 224), device=device)
    stage = None
    if second_stage:  # the teacher of engine/self_training.py; the projection head is then not trained
        stage = SelfTraining(SelfTrainingConfig(checkpoint="(benchmark)", crf=args.crf, crf_workers=args.crf_workers,
                                                tta=args.tta, masks=args.masks),
                             Teacher(net, cluster).to(device), {}, is_direct=False)
        net.project_head.requires_grad_(False)
        optimizers = build_optimizers(OptimizerConfig(), net, linear, cluster)
    times = []
    with stage or contextlib.nullcontext():
        for _ in range(args.steps + 1):  # the first step warms up
            start = time.perf_counter()
            train_step((net, linear, cluster), optimizers, scaler, loss_fn, img, label, args.precision,
                       self_training=stage)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
    return args.batch / sorted(times[1:])[len(times[1:]) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="dino", choices=sorted(BACKBONES))
    parser.add_argument("--arch", default="vit_small", help="a model_type of the family")
    parser.add_argument("--patch", type=int, default=8, help="the family's patch size (8 or 16, 14, 16)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    parser.add_argument("--deterministic", action="store_true",
                        help="time our step without and with deterministic kernels (the cost of deterministic: true)")
    parser.add_argument("--second-stage", action="store_true",
                        help="time a first-stage step and a second-stage (self-training) step")
    parser.add_argument("--crf", default=None, choices=("pydensecrf", "torch"),
                        help="with --second-stage: refine the pseudo-labels with this CRF backend")
    parser.add_argument("--crf-workers", type=int, default=None,
                        help="with --crf pydensecrf: the CRF's processes (default: the usable cores)")
    parser.add_argument("--tta", action="store_true", help="with --second-stage: flip TTA for the teacher")
    parser.add_argument("--masks", default=None, choices=("primaps",),
                        help="with --second-stage: PriMaPs' masks as the pseudo-labels")
    args = parser.parse_args()
    device = torch.device(args.device)
    ours = images_per_second(PPAPLoss(PAPER_COEFF), args, device)
    if args.second_stage:
        other = images_per_second(PPAPLoss(PAPER_COEFF), args, device, second_stage=True)
        results = {"ours_images_per_s": ours, "second_stage_images_per_s": other}
        extras = [f"{args.crf} CRF" if args.crf else "", "TTA" if args.tta else "", args.masks or ""]
        lines = [("first stage", ours), (", ".join(["second stage", *filter(None, extras)]), other)]
    elif args.deterministic:  # the same step, with deterministic kernels
        with deterministic_algorithms(True):
            other = images_per_second(PPAPLoss(PAPER_COEFF), args, device)
        results = {"ours_images_per_s": ours, "deterministic_images_per_s": other}
        lines = [("deterministic: false", ours), ("deterministic: true", other)]
    else:
        other = images_per_second(StraightforwardPPAP(), args, device)
        results = {"straightforward_images_per_s": other, "ours_images_per_s": ours}
        lines = [("straightforward loss", other), ("ours", ours)]
    if args.json:
        print(json.dumps(results))
    print(f"training step, {args.family} {args.arch}/{args.patch}, batch {args.batch}, 224 px, {args.precision}, "
          f"device={device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"  {lines[0][0]:<36s}{lines[0][1]:8.2f} images/s")
    print(f"  {lines[1][0]:<36s}{lines[1][1]:8.2f} images/s   ({lines[1][1] / lines[0][1]:.2f}x)")


if __name__ == "__main__":
    main()
