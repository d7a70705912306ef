"""Time one PPAP loss forward + backward and its peak memory, ours against a straightforward implementation.

The straightforward version follows the original code block by block: it averages the positives by
materialising an (anchors x N x C) tensor and keeps the whole (anchors x N) logits graph for autograd. Both run
on the same inputs and anchors in the same run, and their losses are compared.

Each measurement runs in a fresh process of its own. Time: the median of ``--repeats`` forward + backward passes
after one warm-up. Peak memory: on CUDA, torch's peak allocated bytes; on the CPU, the growth of the resident set
during one forward + backward (after one on a batch of 1, which initialises the libraries), in a process whose
allocator (glibc, ``MALLOC_MMAP_THRESHOLD_``) hands every block
of 64 KiB or more back to the system when it is freed, so that the resident set follows the live tensors instead
of the allocator's cache.

With ``--processes K`` (K > 1) it also runs ours data-parallel in K processes started by torchrun (gloo on the
CPU), each with its 1/K of the batch, the rows mined among the whole batch as training does, and prints each
process's peak memory: what a process holds when the global batch is shared.

    python benchmarks/loss_bench.py                      # official geometry: batch 64, 28x28 patches, 384 channels
    python benchmarks/loss_bench.py --batch 8 --device cpu
    python benchmarks/loss_bench.py --batch 64 --device cpu --processes 2
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from loss import PPAPLoss  # noqa: E402
from config import TrainingCoeff  # noqa: E402
from utils.distributed import ONE_PROCESS, World, launch  # noqa: E402

RESULT = "loss_bench result: "  # the line each data-parallel process prints its measurement on
MMAP_THRESHOLD = 1 << 16  # bytes: blocks this large are mapped and unmapped one by one (CPU memory measurement)
PAPER_COEFF = TrainingCoeff(initialcrit_pos=0.55, initialcrit_amb=0.2, prop_iter=2, tau=0.8, sigma_pos=3, sigma_amb=3)


def straightforward_loss(z, feats, anchors, coeff: TrainingCoeff):
    """The formula block by block, as the original computes it (fp32, any device)."""
    n, c = feats.shape
    f = F.normalize(feats.detach(), dim=1)
    blocks, size = (1, n) if n < coeff.split else (n // coeff.split, coeff.split)
    total = z.new_zeros(())
    for b in range(blocks):
        rows = b * size + anchors[b].to(z.device)
        not_self = torch.ones(len(rows), n, device=z.device)
        not_self[torch.arange(len(rows)), rows] = 0
        anchor = f[rows]
        s = anchor @ f.T
        phi = torch.full((len(rows), 1), coeff.initialcrit_pos, device=z.device)
        psi = torch.full((len(rows), 1), coeff.initialcrit_amb, device=z.device)
        pos = (s > phi).float()
        previous = anchor
        for _ in range(coeff.prop_iter):
            proxy = F.normalize((f.unsqueeze(0) * pos.unsqueeze(-1)).mean(1), dim=1)  # (anchors x N x C)
            s = proxy @ f.T
            moved = 1 - F.cosine_similarity(previous, proxy, dim=1).unsqueeze(1)
            psi, phi = psi + moved / coeff.sigma_amb, phi - moved / coeff.sigma_pos
            pos = (s > phi).float()
            previous = proxy
        pos = pos * not_self
        denominator = torch.logical_or(pos.bool(), s < psi).float() * not_self
        logits = z[rows] @ z.T / coeff.tau
        logits = logits - logits.max(dim=1, keepdim=True).values.detach()
        log_prob = logits - torch.log((torch.exp(logits) * denominator).sum(1, keepdim=True))
        keep = pos.sum(1) > 0
        mean_log_prob = (pos[keep] * log_prob[keep]).sum(1) / pos[keep].sum(1)
        total = total - (coeff.tau / coeff.base_tau) * mean_log_prob.mean()
    return total / blocks


def inputs(batch: int, side: int, channels: int, device: torch.device, seed: int = 0, world: World = ONE_PROCESS):
    """(z, feats, anchors) of the batch; with several processes, z and feats are this process's images."""
    g = torch.Generator().manual_seed(seed)
    n = batch * side * side
    centres = torch.randn(27, channels, generator=g)  # clustered features, like semantic patches
    feats = centres[torch.randint(27, (n,), generator=g)] + 0.8 * torch.randn(n, channels, generator=g)
    z = F.normalize(torch.randn(n, channels, generator=g), dim=1)
    anchors = PPAPLoss(PAPER_COEFF).draw_anchors(n, g)
    images = world.share(batch)
    rows = slice(images.start * side * side, images.stop * side * side)
    return z[rows].to(device), feats[rows].to(device), anchors


def peak_bytes_reset(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the peak resident set size
    return _rss("VmRSS")


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return _rss("VmHWM")


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def measure(which: str, mode: str, batch: int, side: int, channels: int, device: torch.device, repeats: int,
            world: World = ONE_PROCESS) -> dict:
    """One implementation in this process: ``mode`` "time" (median seconds of forward + backward, after a warm-up)
    or "memory" (peak extra bytes of one forward + backward); and the loss. With several processes (ours only),
    this process's part of the batch."""
    z0, feats, anchors = inputs(batch, side, channels, device, world=world)
    ours = PPAPLoss(PAPER_COEFF)
    if mode == "memory":  # initialise the libraries (thread pools, kernels) on a small input first
        small_z, small_feats, small_anchors = inputs(world.size, side, channels, device, world=world)
        run_loss(which, ours, small_z.requires_grad_(), small_feats, small_anchors, world)
    result = {}
    times = []
    for _ in range(repeats + 1 if mode == "time" else 1):
        z = z0.clone().requires_grad_()
        base = peak_bytes_reset(device)
        start = time.perf_counter()
        value = run_loss(which, ours, z, feats, anchors, world)
        times.append(time.perf_counter() - start)
        result["peak_bytes"] = peak_bytes(device) - base
        result["loss"] = value.item()
    if mode == "time":
        result["seconds"] = sorted(times[1:])[len(times[1:]) // 2]
    return result


def run_loss(which: str, ours: PPAPLoss, z, feats, anchors, world: World = ONE_PROCESS):
    """One forward + backward of either implementation; the loss (with several processes, this process's part)."""
    if which == "ours":
        value = ours(z, feats, anchors, world=world).loss
    else:
        value = straightforward_loss(z, feats, anchors, PAPER_COEFF)
    value.backward()
    if z.device.type == "cuda":
        torch.cuda.synchronize(z.device)
    return value


def run_child(which: str, mode: str, args: argparse.Namespace) -> dict:
    env = os.environ.copy()
    if mode == "memory":
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    cmd = [sys.executable, __file__, "--only", which, mode, "--batch", str(args.batch), "--side", str(args.side),
           "--channels", str(args.channels), "--device", args.device, "--repeats", str(args.repeats)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_processes(processes: int, args: argparse.Namespace) -> list[dict]:
    """Ours in ``processes`` torchrun processes (the memory, then the time): one result per process, by rank."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = str(max(1, torch.get_num_threads() // processes))  # the processes share the cores
    results = []
    for mode in ("memory", "time"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               __file__, "--only", "ours", mode, "--world", "--batch", str(args.batch), "--side", str(args.side),
               "--channels", str(args.channels), "--device", args.device, "--repeats", str(args.repeats)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [json.loads(line[len(RESULT):]) for line in done.stdout.splitlines() if line.startswith(RESULT)]
        if done.returncode != 0 or len(lines) != processes:
            raise SystemExit(f"{processes} processes failed:\n{done.stderr[-3000:]}")
        results.append(sorted(lines, key=lambda r: r["rank"]))
    return [{**memory, "seconds": timed["seconds"]} for memory, timed in zip(*results)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--side", type=int, default=28, help="patches per image side")
    parser.add_argument("--channels", type=int, default=384)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    parser.add_argument("--processes", type=int, default=1,
                        help="also run ours in this many data-parallel processes and print each one's peak memory")
    parser.add_argument("--only", nargs=2, metavar=("IMPL", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--world", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only:  # child process: one implementation, one kind of measurement
        world = World(launch(args.device, [])) if args.world else ONE_PROCESS
        device = torch.device(args.device) if world.size == 1 else world.fabric.device
        result = measure(*args.only, args.batch, args.side, args.channels, device, args.repeats, world)
        # one write per line: the processes share the pipe
        sys.stdout.write((RESULT if args.world else "") + json.dumps({**result, "rank": world.rank}) + "\n")
        sys.stdout.flush()
        return
    device = torch.device(args.device)
    results = {which: {**run_child(which, "time", args), "peak_bytes": run_child(which, "memory", args)["peak_bytes"]}
               for which in ("straightforward", "ours")}
    n = args.batch * args.side * args.side
    print(f"PPAP loss forward+backward, N={n} rows ({args.batch} x {args.side}x{args.side}), C={args.channels}, "
          f"device={device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for which, r in results.items():
        print(f"  {which:16s} {r['seconds'] * 1000:9.1f} ms   peak +{r['peak_bytes'] / 2**20:8.1f} MiB   loss {r['loss']:.6f}")
    slow, fast = results["straightforward"], results["ours"]
    if args.json:
        print(json.dumps(results))
    print(f"  speed-up {slow['seconds'] / fast['seconds']:.2f}x, peak memory ratio "
          f"{slow['peak_bytes'] / max(fast['peak_bytes'], 1):.2f}x, "
          f"relative loss difference {abs(slow['loss'] - fast['loss']) / abs(slow['loss']):.1e}")
    if args.processes > 1:
        parts = run_processes(args.processes, args)
        total = sum(p["loss"] for p in parts)
        print(f"  ours in {args.processes} processes, {args.batch // args.processes} images each, rows mined among "
              f"all {n}: loss {total:.6f} (the parts' sum), {max(p['seconds'] for p in parts) * 1000:.1f} ms")
        for p in parts:
            print(f"    process {p['rank']}: peak +{p['peak_bytes'] / 2**20:8.1f} MiB")
        if args.json:
            print(json.dumps({"processes": parts}))


if __name__ == "__main__":
    main()
