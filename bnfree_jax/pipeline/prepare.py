"""`bnfree prepare`: turn a downloaded dataset into the TFDS ArrayRecord format the
data sources read (no TensorFlow involved)."""

from __future__ import annotations

PREPARABLE = ("imagenet2012",)


def prepare_command(args) -> int:
    """Prepares `args.dataset` from `args.source` under `args.data_dir`; prints one line
    saying what was written, and where. A rerun after a kill resumes."""
    from bnfree_jax.data import prepare_imagenet

    if args.dataset not in PREPARABLE:
        raise ValueError(f"cannot prepare {args.dataset!r}; preparable: {', '.join(PREPARABLE)}")
    done = prepare_imagenet(args.source, args.data_dir or None, resize=args.resize,
                            workers=args.workers, val_labels=args.val_labels or None,
                            shard_size=args.shard_size)
    counts = ", ".join(f"{split} {n}" for split, n in done["examples"].items())
    state = ("already prepared" if not done["shards_written"] else
             f"{done['shards_written']} shards written, {done['shards_kept']} kept from an earlier run")
    print(f"{args.dataset} under {done['data_dir']}: {counts} examples ({state})")
    return 0
