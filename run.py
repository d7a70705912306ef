"""Train PPAP from a JSON option file.

    python run.py --opt json/server/cocostuff8.json [--debug] [--resume] [--data_path DIR] [key=value ...]
    python run.py --opt json/server/cocostuff8.json --test      # evaluate the run's best.pth and last.pth again
    torchrun --nproc_per_node=4 run.py --opt json/server/cocostuff8.json   # data-parallel on 4 GPUs
    python run.py --opt json/demo.json --multirun seed=0,1,2 optimizer.net.lr=1e-3,5e-4 [--jobs N] [--resume]

Exit status: 0 done, 1 training diverged (a non-finite loss) or, for a sweep, a run failed, 2 a mistake in the
options, data or files.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from utils.cli import base_parser, config_from_args, run_main, sets_on_command_line
from config import NONE_WEIGHTS, Config, config_to_dict
from utils.errors import ConfigError, ExitStatus
from config.overrides import is_sweep


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = base_parser("Train PPAP: a segmentation head on a frozen DINO ViT, without labels.")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run from its last.pth (a sweep: skip its finished runs, resume the others)")
    parser.add_argument("--multirun", action="store_true",
                        help="a sweep: one run per combination of the values of the overrides, in Hydra's grammar "
                             "(seed=0,1,2 lr=range(1,4)), each in {output_dir}/{wandb.name}/<its values>/")
    parser.add_argument("--jobs", type=int, default=None,
                        help="with --multirun: run this many runs at once, one per GPU (default 1)")
    args = parser.parse_intermixed_args(argv)  # dotted overrides may come before or after the flags
    if args.multirun:
        return _sweep(args)
    if args.jobs is not None:
        raise ConfigError("--jobs runs the runs of a sweep side by side; it needs --multirun")
    for item in args.overrides:
        if is_sweep(item):
            raise ConfigError(f"command-line override {item!r} gives several values: add --multirun to train one run "
                              f"per value, or quote a value that holds a comma ({item.partition('=')[0]}='a,b')")
    if args.checkpoint is not None:  # the original accepted it here and ignored it
        raise ConfigError("run.py does not read --checkpoint: evaluate a checkpoint with "
                          "python eval.py --checkpoint FILE, continue this run with --resume, or evaluate its "
                          "best.pth and last.pth with --test")
    cfg = config_from_args(args)
    from utils.device import deterministic_algorithms  # torch loads here, under run_main: Ctrl-C meanwhile ends quietly

    with deterministic_algorithms(cfg.deterministic):
        return _train(cfg, args)


def _train(cfg: Config, args: argparse.Namespace) -> int:
    from engine.evaluate import evaluation_set
    from engine.sweep import follow_sweep
    from engine.rundir import LAST, LOCK_FILE
    from engine.train import TrainingDiverged, evaluate_run, train
    from utils.distributed import World, launch
    from engine.tracking import Tracker, require_credentials, wandb_mode

    run_dir = Path(cfg.output_dir) / cfg.wandb.name
    follow_sweep(run_dir)
    fabric = launch(cfg.device, cfg.gpu_ids)  # one process, or this one's place among those torchrun started
    world = World(fabric)
    mode = wandb_mode(cfg.wandb, disabled=args.debug or args.test or not world.is_main,
                      from_command_line=sets_on_command_line(args, "wandb.mode"))
    world.agree(lambda: require_credentials(mode))  # before any work
    if cfg.eval.split != "val" and not args.test:  # training checks val itself; a missing test split is told now,
        world.agree(lambda: evaluation_set(cfg))  # not after the training, at the final evaluation

    def make_tracker(run_id: Optional[str]) -> Tracker:
        return Tracker(cfg.wandb, run_dir, config_to_dict(cfg), default_tag=cfg.dataset.data_type, mode=mode,
                       run_id=run_id)

    if args.test:
        evaluate_run(cfg, run_dir, fabric, make_tracker(None))
        return ExitStatus.OK
    from_scratch = cfg.self_training.checkpoint is None  # a second stage's backbone is its first stage's
    if cfg.model.pretrained.pretrained_weights == NONE_WEIGHTS and from_scratch and world.is_main:
        print("NOTE: this is a smoke run with a RANDOM backbone (model.pretrained.pretrained_weights is \"none\"): "
              "it shows that the pipeline works, not what PPAP learns. For real training use DINO weights "
              "(pretrained_weights null, or a local file) and real data, e.g. json/server/cocostuff8.json.")
    try:
        train(cfg, run_dir, fabric, make_tracker, resume=args.resume)
    except TrainingDiverged as err:  # every process sees the same losses and stops; process 0 says why
        if world.is_main:
            print(f"error: {err}", file=sys.stderr)
        return ExitStatus.FAILED
    if not world.is_main:
        return ExitStatus.OK
    written = [p for p in sorted(run_dir.iterdir()) if p.is_file() and p.name != LOCK_FILE]
    print(f"\nwrote into {run_dir}:")
    for path in written:
        print(f"  {path}")
    print(f"evaluate a checkpoint again with: python eval.py --checkpoint {run_dir / LAST}")
    return ExitStatus.OK


def _sweep(args: argparse.Namespace) -> int:
    from engine.sweep import run_sweep

    if args.test or args.checkpoint is not None:
        raise ConfigError("--multirun trains; evaluate a run of a sweep with python run.py --opt FILE --test "
                          "output_dir=SWEEP_FOLDER wandb.name=RUN, or summarise the runs with "
                          "python -m tools.report SWEEP_FOLDER")
    return run_sweep(Path(__file__).resolve(), args.opt, args.overrides, data_path=args.data_path, debug=args.debug,
                     resume=args.resume, jobs=args.jobs or 1)


if __name__ == "__main__":
    sys.exit(run_main(main))
