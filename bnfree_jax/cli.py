"""The `bnfree` command. Each subcommand is a thin wrapper over a pipeline function; any
bad input ends in one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import argparse
import sys


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="configs/mnist_alexnet.py",
                   help="ml_collections config file, optionally with an argument: FILE.py[:ARG]")
    p.add_argument("--workdir", required=True, help="directory for checkpoints, metrics, artifact and report")
    p.add_argument("--profile_steps", default=None, metavar="A:B",
                   help="write a JAX profiler trace of steps A..B of each training phase to WORKDIR/profile")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, e.g. model.w_bits=2 ptl.stage_steps=300 (before or "
                        "after the options, in order: a later one wins)")


def _ptq_args(p: argparse.ArgumentParser) -> None:
    """The calibration's options; unset ones take `pipeline.ptq.PtqOptions`' defaults."""
    p.add_argument("--calib", metavar="METHOD",
                   help="activation calibrator: minmax, percentile, entropy (default) or mse")
    p.add_argument("--calib-images", type=int, metavar="N", help="training images to calibrate on (default 256)")
    p.add_argument("--weight-calib", metavar="minmax|mse",
                   help="weight range: max-abs (default), or the MSE-optimal clip (per tensor or per channel "
                        "by model.requant)")
    p.add_argument("--percentile", type=float, metavar="P",
                   help="with --calib percentile: the percentile, in (0, 100] (default 99.99)")
    p.add_argument("--calib-seed", type=int, metavar="S",
                   help="seed of the calibration sample drawn from the training images (default 0)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="bnfree",
        description="Train BatchNorm-free low-bit networks by progressive tandem distillation from a BN "
                    "teacher, export them as integer-only artifacts, and verify them with an integer "
                    "interpreter. Start with: bnfree run --config configs/mnist_alexnet.py --workdir runs/job")
    ap.add_argument("--distributed", action="store_true",
                    help="initialise jax.distributed (TPU pods auto-detect; else set coordinator flags/env)")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train-teacher", help="train the float BN teacher (and with --qat the QAT teacher)")
    _config_args(p)
    p.add_argument("--qat", action="store_true", help="also fine-tune the W/A-bit QAT teacher")
    p.add_argument("--force", action="store_true", help="discard the workdir's previous results")

    p = sub.add_parser("distill", help="teacher phases (if not done) then progressive tandem distillation")
    _config_args(p)
    p.add_argument("--dry-run", action="store_true", help="print the stage plan and exit")
    p.add_argument("--force", action="store_true", help="discard the workdir's previous results")

    p = sub.add_parser("export", help="integerise the distilled student into WORKDIR/export")
    p.add_argument("--workdir", required=True, help="a workdir where `distill` finished")
    p.add_argument("--onnx", action="store_true", help="also write WORKDIR/export/model.onnx (integer ops only)")

    p = sub.add_parser("eval-int", help="evaluate an exported artifact with the integer interpreter")
    p.add_argument("--artifact", required=True, help="artifact directory (manifest.json + model.safetensors)")
    p.add_argument("--split", default="test", help="dataset split to evaluate: test (default), train, or holdout "
                   "(the last data.holdout training examples of a job run with data.holdout=N)")
    p.add_argument("--data-dir", default="", help="TFDS data dir (default: $TFDS_DATA_DIR or the cache)")
    p.add_argument("--images", default="", help="evaluate your own images instead: a .npy of uint8 [N,H,W,C]")
    p.add_argument("--labels", default="", help="with --images: a .npy of integer labels [N]")
    p.add_argument("--batch", type=int, default=1000, help="images per interpreter call")
    p.add_argument("--max-examples", type=int, default=0,
                   help="evaluate only the first N examples (0: all; the export's n is in its manifest)")
    p.add_argument("--out", default="", help="where to write the JSON result (default: ARTIFACT/eval_int.json)")

    p = sub.add_parser("prepare", help="turn downloaded ILSVRC2012 into the TFDS ArrayRecord dataset the "
                       "jobs read (no TensorFlow; resumable)")
    from bnfree_jax.pipeline.prepare import PREPARABLE

    p.add_argument("dataset", choices=PREPARABLE, help="the dataset to prepare")
    p.add_argument("--source", required=True, help="directory holding train/ and val/ (extracted), or "
                   "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (+ ILSVRC2012_devkit_t12.tar.gz)")
    p.add_argument("--data-dir", default="", help="TFDS data dir to write (default: $TFDS_DATA_DIR or the cache)")
    p.add_argument("--resize", type=int, default=None,
                   help="store images with their shorter side resized to N pixels (default: as they are)")
    p.add_argument("--workers", type=int, default=None, help="processes decoding images (default: all cores)")
    p.add_argument("--val-labels", default="", help="text file with one wnid per validation image in file-name "
                   "order (instead of the devkit, whose meta.mat needs scipy)")
    p.add_argument("--shard-size", type=int, default=1024, help="examples per shard, the unit of resumption")

    p = sub.add_parser("sensitivity", help="each layer's loss increase at 1, 2, 4 bits in a finished job, and "
                       "per-layer bits under an artifact-size budget as model.layers rules")
    p.add_argument("--workdir", required=True, help="a workdir where `bnfree run` finished")
    p.add_argument("--budget-bytes", type=int, default=None,
                   help="propose per-layer widths whose artifact tensors fit in B bytes")
    p.add_argument("--examples", type=int, default=5000,
                   help="validation images (the job's held-out split, else the last N training examples)")

    p = sub.add_parser("sweep", help="PTL and every baseline over bit widths, requant settings and seeds")
    _config_args(p)

    p = sub.add_parser("ptq", help="post-training quantization of the float teacher (no student training): "
                       "calibrate, export and verify into WORKDIR/ptq/<calibration>")
    _config_args(p)
    _ptq_args(p)

    p = sub.add_parser("ptq-sweep", help="the calibration table: PTQ over calibrators × bits × images × requant "
                       "× samples, on one float teacher (a config with a `ptq_sweep` block)")
    _config_args(p)

    p = sub.add_parser("run", help="the whole job: teacher → QAT → PTL → export → integer check → report")
    _config_args(p)
    p.add_argument("--force", action="store_true", help="discard the workdir's previous results")
    return ap


def dispatch(args) -> int:
    if args.command == "prepare":  # before `commands`, which imports the whole training stack
        from bnfree_jax.pipeline.prepare import prepare_command
        return prepare_command(args)
    from bnfree_jax.pipeline import commands

    if args.command == "eval-int":
        return commands.eval_int(args)
    if args.command == "export":
        return commands.export(args.workdir, onnx=args.onnx)
    if args.command == "sensitivity":
        return commands.sensitivity(args)
    config = commands.load_config(args.config, args.overrides)
    return getattr(commands, args.command.replace("-", "_"))(config, args.workdir, args)


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, with KEY=VALUE overrides accepted on both sides of the options.

    argparse gives a `nargs="*"` positional only its first run of words, so in
    `run k=1 --workdir D k=2` the `k=2` is left over; launchers append `--workdir` after the
    user's overrides, so such words are overrides too (kept in command-line order).  Left-over
    words of a command without overrides, and unknown options, are a one-line error (status 2).
    """
    ap = build_parser()
    args, extra = ap.parse_known_args(argv)
    if hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *extra]
        stray = [w for w in args.overrides if w.startswith(("-", "=")) or "=" not in w]
    else:
        stray = extra
    if stray:
        ap.exit(2, f"error: unrecognized arguments for bnfree {args.command}: {' '.join(stray)} "
                   f"(config overrides are KEY=VALUE; see bnfree {args.command} -h)\n")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from bnfree_jax.pipeline.errors import one_line_errors

    try:
        with one_line_errors() as outcome:
            if args.distributed:
                from bnfree_jax.pipeline.multihost import initialize
                initialize()
            outcome.code = dispatch(args)
            if args.distributed:  # meet the other processes here, before interpreter teardown
                import jax
                jax.distributed.shutdown()
    except SystemExit as stop:
        if args.distributed:
            from bnfree_jax.pipeline.multihost import leave_now
            leave_now(stop.code)
        raise
    return outcome.code


if __name__ == "__main__":
    sys.exit(main())
