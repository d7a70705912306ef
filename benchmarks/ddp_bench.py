"""Data-parallel training throughput: images/s of the full PPAP step with 1, 2, ... processes, in one run.

Each measurement starts the training step of engine/train.py (the network, the PPAP loss over the global batch,
the probes, backward through DDP, clipping, three optimizer steps) in its own processes, with torchrun for more
than one, on random weights and random images (the speed does not depend on them). The global batch is the same
for every number of processes, so the ratio is the speed-up of one training run. On the CPU the processes share
the machine's cores (torchrun gives each one thread; one process uses them all).

    python benchmarks/ddp_bench.py                                  # vit_tiny/16, 1 and 2 processes, CPU
    python benchmarks/ddp_bench.py --device cuda --processes 1 2 4 8 --arch vit_small --patch 8 --batch 64
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULT = "ddp_bench result: "  # the line of process 0 that carries its measurement


def measure(args: argparse.Namespace) -> dict[str, float]:
    """Run in every process: time ``args.steps`` training steps after one warm-up step."""
    import torch

    from benchmarks.loss_bench import PAPER_COEFF
    from benchmarks.train_bench import N_CLASSES, train_step
    from engine.train import build_optimizers, iteration_stream
    from loss import PPAPLoss
    from model import build_model
    from config import BACKBONE_WIDTH, ModelConfig, OptimizerConfig, PretrainedConfig
    from utils.device import grad_scaler
    from utils.distributed import World, launch

    fabric = launch(args.device, list(range(8)))
    world, device = World(fabric), fabric.device
    torch.manual_seed(0)
    cfg = ModelConfig(dim=BACKBONE_WIDTH[args.arch], pretrained=PretrainedConfig(
        model_type=args.arch, dino_patch_size=args.patch, pretrained_weights="none"))
    modules = [fabric.to_device(m) for m in build_model(cfg, N_CLASSES)]
    optimizers = build_optimizers(OptimizerConfig(), *modules)
    net, linear, cluster = (fabric.setup_module(m) for m in modules)
    scaler, loss_fn = grad_scaler(device, args.precision), PPAPLoss(PAPER_COEFF)
    local = args.batch // world.size
    img = torch.randn(local, 3, args.res, args.res, device=device)
    label = torch.randint(N_CLASSES, (local, args.res, args.res), device=device)
    channels = net.module.model.embed_dim

    def step(iteration: int) -> None:
        train_step((net, linear, cluster), optimizers, scaler, loss_fn, img, label, args.precision, world,
                   iteration_stream(0, iteration), channels)

    step(0)
    world.barrier()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for i in range(args.steps):
        step(i + 1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    world.barrier()
    seconds = time.perf_counter() - start
    return {"processes": world.size, "images_per_s": args.batch * args.steps / seconds,
            "seconds_per_step": seconds / args.steps}


def run_with(processes: int, args: argparse.Namespace, passthrough: list[str]) -> dict[str, float]:
    launcher = [] if processes == 1 else ["-m", "torch.distributed.run", "--standalone",
                                          f"--nproc_per_node={processes}"]
    env = dict(os.environ)
    if processes > 1 and args.device == "cpu":
        env["OMP_NUM_THREADS"] = "1"  # torchrun's default, said explicitly: the processes share the cores
    done = subprocess.run([sys.executable, *launcher, str(Path(__file__).resolve()), "--worker", *passthrough],
                          cwd=ROOT, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{processes} process(es) failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[0][len(RESULT):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="vit_tiny", choices=["vit_tiny", "vit_small", "vit_base"])
    parser.add_argument("--patch", type=int, default=16, choices=[8, 16])
    parser.add_argument("--batch", type=int, default=16, help="global batch")
    parser.add_argument("--res", type=int, default=224)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args, _ = parser.parse_known_args()
    if args.worker:
        result = measure(args)
        if int(os.environ.get("RANK", 0)) == 0:
            print(RESULT + json.dumps(result), flush=True)
        return
    passthrough = [f"--{k}={v}" for k, v in vars(args).items()
                   if k in ("arch", "patch", "batch", "res", "steps", "device", "precision")]
    results = [run_with(k, args, passthrough) for k in args.processes]
    base = results[0]["images_per_s"]
    for r in results:
        r["speedup"] = r["images_per_s"] / base
    if args.json:
        print(json.dumps({"config": {k: v for k, v in vars(args).items() if k not in ("json", "worker")},
                          "results": results}))
        return
    print(f"{args.arch}/{args.patch}, global batch {args.batch}, {args.res} px, {args.device} {args.precision}")
    for r in results:
        print(f"  {r['processes']} process(es): {r['images_per_s']:7.2f} images/s  ({r['speedup']:.2f}x)")


if __name__ == "__main__":
    main()
