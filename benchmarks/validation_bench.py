"""What the label-free criteria add to a validation: the time of engine/evaluate.py's ``evaluate`` on the same images
without CRF, without and with ``LabelFree`` (engine/criteria.py), alternately, in one run.

A validation during training is exactly this call (``validate_and_save``), so the ratio is the validation's slow-down.
Random weights and random images at 320 px: the time does not depend on them.

    python benchmarks/validation_bench.py                                  # ViT-S/8, 16 images, the CPU
    python benchmarks/validation_bench.py --arch vit_tiny --patch 16 --images 64
    python benchmarks/validation_bench.py --device cuda --images 256 --precision fp16
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from config import BACKBONES, EvalConfig, ModelConfig, PretrainedConfig, TrainingCoeff  # noqa: E402
from engine.criteria import LabelFree  # noqa: E402
from engine.evaluate import EVAL_BATCH_SIZE, evaluate  # noqa: E402
from loss import PPAPLoss  # noqa: E402
from model import build_model  # noqa: E402

N_CLASSES = 27  # COCO-Stuff
RES = 320  # eval.res


class RandomImages(Dataset):
    def __init__(self, n: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 3, RES, RES, generator=generator)
        self.labels = torch.randint(N_CLASSES, (n, RES, RES), generator=generator)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"img": self.images[i], "label": self.labels[i]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="dino", choices=sorted(BACKBONES))
    parser.add_argument("--arch", default="vit_small", help="a model_type of the family")
    parser.add_argument("--patch", type=int, default=8, help="the family's patch size (8 or 16, 14, 16)")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="timed validations of each kind, alternating")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = ModelConfig(dim=BACKBONES[args.family].widths[args.arch], pretrained=PretrainedConfig(
        name=args.family, model_type=args.arch, dino_patch_size=args.patch, pretrained_weights="none"))
    net, linear, cluster = (m.to(device) for m in build_model(cfg, N_CLASSES))
    loader = DataLoader(RandomImages(args.images), batch_size=EVAL_BATCH_SIZE)
    loss_fn = PPAPLoss(TrainingCoeff())

    def validation(with_criteria: bool) -> float:
        label_free = (LabelFree(cluster, loss_fn, False, None, net.model.embed_dim, device) if with_criteria
                      else None)
        start = time.perf_counter()
        evaluate(net, linear, cluster, loader, device, args.precision, EvalConfig(), N_CLASSES,
                 label_free=label_free)
        if label_free is not None:
            label_free.result()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    validation(True)  # warm-up
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.repeats):
        for with_criteria in (False, True):
            times[with_criteria].append(validation(with_criteria))
    plain, criteria = (sorted(times[k])[len(times[k]) // 2] for k in (False, True))
    if args.json:
        print(json.dumps({"without_s": plain, "with_s": criteria}))
    print(f"validation of {args.images} images at {RES} px, {args.family} {args.arch}/{args.patch}, {args.precision}, "
          f"device={device}, torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"  without the label-free criteria {plain:8.2f} s")
    print(f"  with them                       {criteria:8.2f} s   ({criteria / plain:.2f}x)")


if __name__ == "__main__":
    main()
