"""What PPAP's thresholds mean for a backbone: the distribution of patch-to-patch cosine similarity of its features on
a sample of the training set, and where the configured Phi_0 (``training_coeff.initialcrit_pos``) and Psi_0
(``training_coeff.initialcrit_amb``) fall in it.

    python -m tools.similarity --opt json/server/cocostuff_dinov2_b14.json [--images 32] [--json] [key=value ...]

PPAP's thresholds were chosen for DINO's features; other backbones (DINOv2, DINOv3, a distilled ViT) spread their
similarities differently, so the same Phi_0 can make a tenth or half of all patches positives. The similarities are
those the loss mines from: the frozen backbone's final features (no dropout), L2-normalised, at the training
resolution, between every pair of patches of the sampled images (an image with itself included, as in a batch).
"""
from __future__ import annotations

import json
import sys
from typing import Optional, Sequence

from utils.errors import ExitStatus

QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)
DEFAULT_IMAGES = 32
SAMPLE_SEED = 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    import torch
    import torch.nn.functional as F

    from dataset import build_dataset
    from model import build_model
    from utils.cli import base_parser, config_from_args
    from utils.distributed import launch

    parser = base_parser(__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--images", type=int, default=DEFAULT_IMAGES, help="training images to sample")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_intermixed_args(argv)
    cfg = config_from_args(args)
    device = launch(cfg.device, cfg.gpu_ids).device
    train_set = build_dataset(cfg.dataset, "train")
    n = min(args.images, len(train_set))
    chosen = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(SAMPLE_SEED))[:n].tolist()
    torch.manual_seed(cfg.seed)  # a random backbone ("none") is drawn from the seed, the same every time
    net = build_model(cfg.model, train_set.n_classes)[0].to(device).eval()
    feats = []
    with torch.inference_mode():
        for i in range(0, n, 8):
            img = torch.stack([train_set[j]["img"] for j in chosen[i:i + 8]]).to(device)
            out = net(img).feats
            feats.append(out.permute(0, 2, 3, 1).reshape(-1, out.shape[1]).float())
    f = F.normalize(torch.cat(feats), dim=1)
    sim = (f @ f.T).flatten()
    quantiles = torch.quantile(sim[torch.randperm(sim.numel(), generator=torch.Generator().manual_seed(SAMPLE_SEED))
                                   [:2**24].to(sim.device)], torch.tensor(QUANTILES, device=sim.device)).tolist()
    coeff = cfg.training_coeff
    above, below = float((sim > coeff.initialcrit_pos).float().mean()), float((sim < coeff.initialcrit_amb).float().mean())
    patches = f.shape[0] // n
    batch_rows = cfg.dataloader.batch_size * patches
    result = {
        "backbone": cfg.model.pretrained.description, "images": n, "patches_per_image": patches,
        "quantiles": dict(zip((f"{q:g}" for q in QUANTILES), quantiles)),
        "initialcrit_pos": coeff.initialcrit_pos, "share_above_initialcrit_pos": above,
        "initialcrit_amb": coeff.initialcrit_amb, "share_below_initialcrit_amb": below,
        "batch_rows": batch_rows, "initial_positives_per_anchor": above * (batch_rows - 1),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return ExitStatus.OK
    print(f"{result['backbone']}: cosine similarity of patch pairs, {n} training images of "
          f"{cfg.dataset.data_type} at {cfg.dataset.res} px ({patches} patches each)")
    print("  quantiles  " + "  ".join(f"{k}: {v:+.3f}" for k, v in result["quantiles"].items()))
    print(f"  initialcrit_pos {coeff.initialcrit_pos:+.3f}: {100 * above:5.1f}% of pairs above it; an anchor starts "
          f"with about {result['initial_positives_per_anchor']:.0f} positives among the {batch_rows} patches of a "
          f"batch of {cfg.dataloader.batch_size}")
    print(f"  initialcrit_amb {coeff.initialcrit_amb:+.3f}: {100 * below:5.1f}% of pairs below it (confident "
          f"negatives from the start); {100 * (1 - above - below):5.1f}% in between (ambiguous)")
    print("The published thresholds were tuned on DINO ViT-S/8: to carry them over, run this with a DINO option file "
          "on the same data and choose values that give this backbone similar shares; then check them with short runs.")
    return ExitStatus.OK


if __name__ == "__main__":
    from utils.cli import run_main

    sys.exit(run_main(main))
