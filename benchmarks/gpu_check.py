"""The GPU check: every device-dependent part of the project on one GPU, in one command, with one table.

    python benchmarks/gpu_check.py                        # on a CUDA machine: about 5 minutes or less
    python benchmarks/gpu_check.py --device cpu --quick   # the same steps, shrunk, to check this script itself

Each step runs in a process of its own, with a time limit:
1. the tests that take a device: ``python -m pytest -m device --device cuda``;
2. the demo (json/demo.json: synthetic data, one epoch, validation, final evaluation with CRF) in fp16 and in bf16;
3. the training-step benchmark at vit_small/8, batch 64, fp16: our PPAP loss against the straightforward one, and
   our step with ``deterministic: true`` against without (its cost);
4. the loss benchmark at the official geometry (batch 64, 28 x 28 patches, 384 channels);
5. the evaluation of the fp16 demo's last.pth with the torch CRF backend on the GPU: how much of its time the CRF
   takes, and its metrics against pydensecrf's;
6. the CRF benchmark (pydensecrf's serial loop and process pool, the torch backend on the CPU and on the GPU).
It prints one Markdown table, ready for the README, and exits with status 1 if any step failed.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, NamedTuple, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from engine.rundir import EVAL_REPORT, FINAL_METRICS, LAST, LOG_FILE  # noqa: E402
from utils.errors import ExitStatus  # noqa: E402


class Row(NamedTuple):
    check: str
    setting: str
    result: str
    seconds: float
    ok: bool


def run(cmd: list[str], timeout: float) -> tuple[bool, str, float]:
    """Run ``cmd`` in the project root; (exit status 0, its output, seconds)."""
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        ok, output = done.returncode == 0, done.stdout + done.stderr
    except subprocess.TimeoutExpired as err:
        ok, output = False, f"timed out after {timeout:.0f} s\n{err.stdout or ''}"
    return ok, output, time.perf_counter() - start


def last_json(output: str) -> dict:
    """The last line of ``output`` that is a JSON object (the benchmarks print one with --json)."""
    for line in reversed(output.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON result in the output")


def step(check: str, setting: str, cmd: list[str], timeout: float, describe: Callable[[str], str]) -> Row:
    ok, output, seconds = run(cmd, timeout)
    try:
        result = describe(output) if ok else "FAILED: " + _tail(output)
    except (ValueError, KeyError, OSError) as err:  # the step ran but its result is not where it should be
        ok, result = False, f"FAILED to read the result ({err}): {_tail(output)}"
    print(f"[{'ok' if ok else 'FAILED'}] {check} ({seconds:.0f} s)", file=sys.stderr)
    if not ok:
        print(output[-4000:], file=sys.stderr)
    return Row(check, setting, result, seconds, ok)


def _tail(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    return lines[-1][:200] if lines else "(no output)"


def describe_tests(output: str) -> str:
    return _tail(output).strip("= ")


def describe_demo(out_dir: Path) -> Callable[[str], str]:
    def describe(_: str) -> str:
        final = json.loads((out_dir / FINAL_METRICS).read_text())["last"]
        setting = "crf" if "crf" in final else "no_crf"
        train = [json.loads(line) for line in (out_dir / LOG_FILE).read_text().splitlines()]
        speeds = [r["images_per_s"] for r in train if r["type"] == "train"][1:]  # the first includes start-up
        speed = f"; training {sum(speeds) / len(speeds):.0f} images/s" if speeds else ""
        return (f"last.pth {'after' if setting == 'crf' else 'before'} CRF: Cluster mIoU "
                f"{final[setting]['Cluster_mIoU']:.1f}, Cluster acc {final[setting]['Cluster_Accuracy']:.1f}, "
                f"Linear acc {final[setting]['Linear_Accuracy']:.1f}{speed}")
    return describe


def describe_train(output: str) -> str:
    r = last_json(output)
    plain, ours = r["straightforward_images_per_s"], r["ours_images_per_s"]
    return f"straightforward loss {plain:.1f} images/s, ours {ours:.1f} images/s ({ours / plain:.2f}x)"


def describe_deterministic(output: str) -> str:
    r = last_json(output)
    free, fixed = r["ours_images_per_s"], r["deterministic_images_per_s"]
    return f"deterministic: false {free:.1f} images/s, true {fixed:.1f} images/s ({fixed / free:.2f}x)"


def describe_loss(output: str) -> str:
    r = last_json(output)
    slow, fast = r["straightforward"], r["ours"]
    return (f"straightforward {slow['seconds'] * 1e3:.1f} ms, +{slow['peak_bytes'] / 2**20:.0f} MiB; ours "
            f"{fast['seconds'] * 1e3:.1f} ms, +{fast['peak_bytes'] / 2**20:.0f} MiB "
            f"({slow['seconds'] / fast['seconds']:.1f}x faster, {slow['peak_bytes'] / max(fast['peak_bytes'], 1):.1f}x "
            f"less memory; losses differ by {abs(slow['loss'] - fast['loss']) / abs(slow['loss']):.0e})")


def describe_ddp(output: str) -> str:
    return ", ".join(f"{r['processes']}: {r['images_per_s']:.1f} images/s ({r['speedup']:.2f}x)"
                     for r in last_json(output)["results"])


def describe_crf(output: str) -> str:
    r = last_json(output)
    if not r["identical"]:
        raise ValueError("the pool's results differ from the serial loop's")
    serial = r["serial_images_per_s"]
    torch_rates = ", ".join(f"torch on {kind} {r[f'torch_{kind}_images_per_s']:.2f} images/s "
                            f"({r[f'torch_{kind}_images_per_s'] / serial:.1f}x; two maps per image "
                            f"{r[f'torch_{kind}_two_maps_images_per_s']:.2f} images/s, "
                            f"{2 * r[f'torch_{kind}_two_maps_images_per_s'] / serial:.1f}x)"
                            for kind in ("cpu", "cuda") if f"torch_{kind}_images_per_s" in r)
    peak = (f"; peak GPU memory {r['torch_cuda_peak_bytes'] / 2**20:.0f} MiB (two maps "
            f"{r['torch_cuda_two_maps_peak_bytes'] / 2**20:.0f} MiB)" if "torch_cuda_peak_bytes" in r else "")
    return (f"pydensecrf serial {serial:.2f} images/s, pool of {r['workers']} {r['pool_images_per_s']:.2f} "
            f"images/s (identical); {torch_rates}{peak}; labels as pydensecrf's on {100 * r['label_agreement']:.2f}% "
            f"of pixels")


def describe_torch_crf_eval(demo_dir: Path, out_dir: Path) -> Callable[[str], str]:
    def describe(_: str) -> str:
        report = json.loads((out_dir / EVAL_REPORT).read_text())
        seconds = report["seconds"]
        if "crf" not in report:  # --quick
            return f"{report['n_images']} images in {seconds['total']:.1f} s, without CRF"
        pydensecrf = json.loads((demo_dir / FINAL_METRICS).read_text())["last"]["crf"]
        gap = max(abs(report["crf"][k] - pydensecrf[k]) for k in pydensecrf)
        return (f"{report['n_images']} images in {seconds['total']:.1f} s, of which the CRF {seconds['crf']:.1f} s "
                f"({100 * seconds['crf'] / seconds['total']:.0f}%); metrics after CRF within {gap:.2f} points of "
                f"pydensecrf's")
    return describe


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}"
    return f"CPU ({torch.get_num_threads()} threads)"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="small sizes, to check the script on a CPU")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device is available (use --device cpu --quick to check the script itself)")
    py, quick = sys.executable, args.quick
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        rows.append(step("tests that take a device", f"pytest -m device --device {args.device}",
                         [py, "-m", "pytest", "-q", "-m", "device", "--device", args.device, "-p", "no:cacheprovider"],
                         300, describe_tests))
        for precision in ("fp16", "bf16"):
            out_dir = Path(tmp) / "output" / f"demo_{precision}"
            shrink = ["dataset.res=112", "eval.is_crf=false", "dataloader.batch_size=4"] if quick else []
            rows.append(step(f"demo, {precision}", "json/demo.json: 200 images, 1 epoch" + (", shrunk" if quick else ""),
                             [py, "run.py", "--opt", "json/demo.json", "--debug", f"device={args.device}",
                              f"precision={precision}", f"output_dir={Path(tmp) / 'output'}",
                              f"wandb.name=demo_{precision}", f"dataset.data_path={Path(tmp) / 'demo_data'}", *shrink],
                             600, describe_demo(out_dir)))
        arch, patch, batch = ("vit_tiny", "16", "2") if quick else ("vit_small", "8", "64")
        rows.append(step("training step", f"{arch}/{patch}, batch {batch}, 224 px, fp16",
                         [py, "benchmarks/train_bench.py", "--arch", arch, "--patch", patch, "--batch", batch,
                          "--precision", "fp16", "--device", args.device, "--steps", "2" if quick else "5", "--json"],
                         300, describe_train))
        rows.append(step("training step, deterministic: true", f"{arch}/{patch}, batch {batch}, 224 px, fp16",
                         [py, "benchmarks/train_bench.py", "--arch", arch, "--patch", patch, "--batch", batch,
                          "--precision", "fp16", "--device", args.device, "--steps", "2" if quick else "5", "--json",
                          "--deterministic"], 300, describe_deterministic))
        loss_batch = "2" if quick else "64"
        rows.append(step("PPAP loss, forward + backward", f"batch {loss_batch} x 28 x 28 patches, 384 channels",
                         [py, "benchmarks/loss_bench.py", "--batch", loss_batch, "--device", args.device, "--json"],
                         300, describe_loss))
        gpus = torch.cuda.device_count() if args.device.startswith("cuda") else 2  # 2 CPU processes with --quick
        if gpus > 1 and (quick or args.device.startswith("cuda")):
            processes = [str(k) for k in (1, 2, 4, 8) if k <= gpus]
            device = "cuda" if args.device.startswith("cuda") else "cpu"
            rows.append(step("data-parallel training", f"{arch}/{patch}, global batch {batch}, {' / '.join(processes)} "
                             f"processes", [py, "benchmarks/ddp_bench.py", "--arch", arch, "--patch", patch, "--batch",
                                            batch, "--device", device, "--processes", *processes, "--steps",
                                            "2" if quick else "5", "--json",
                                            *(["--precision", "fp16"] if device == "cuda" else [])],
                             600, describe_ddp))
        demo_dir = Path(tmp) / "output" / "demo_fp16"
        rows.append(step("evaluation, torch CRF", "the fp16 demo's last.pth, eval.crf_backend=torch",
                         [py, "eval.py", "--checkpoint", str(demo_dir / LAST), "--debug", f"device={args.device}",
                          "eval.crf_backend=torch", "--out", str(Path(tmp) / "eval_torch_crf"), *shrink],
                         300, describe_torch_crf_eval(demo_dir, Path(tmp) / "eval_torch_crf")))
        images = "4" if quick else "16"
        rows.append(step("dense CRF", f"{images} images, 320 px, 27 classes",
                         [py, "benchmarks/crf_bench.py", "--images", images, "--json"], 300, describe_crf))
    print(f"\n{device_name(args.device)}; torch {torch.__version__}"
          f"{'; --quick (shrunk sizes)' if quick else ''}\n")
    print("| check | setting | result | time |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row.check} | {row.setting} | {row.result} | {row.seconds:.0f} s |")
    print(f"\ntotal {sum(r.seconds for r in rows):.0f} s; {sum(not r.ok for r in rows)} step(s) failed")
    return ExitStatus.OK if all(r.ok for r in rows) else ExitStatus.FAILED


if __name__ == "__main__":
    sys.exit(main())
