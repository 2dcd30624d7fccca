"""ILSVRC2012 → the TFDS ArrayRecord dataset `imagenet2012` that `get_source` reads, with
no TensorFlow.

`tfds build imagenet2012` needs TensorFlow and writes TFRecord by default, which
`tfds.data_source` refuses; this writes the ArrayRecord shards and the dataset_info
itself, with the features and version of TFDS's own imagenet2012 builder, from either
layout of the original data:

- extracted: `SOURCE/train/<wnid>/*.JPEG` and `SOURCE/val/<wnid>/*.JPEG` (or a flat
  `SOURCE/val/*.JPEG` with validation labels, as for the tar below);
- the original archives: `ILSVRC2012_img_train.tar` (a tar of per-class `<wnid>.tar`)
  and `ILSVRC2012_img_val.tar` (flat JPEGs), the validation labels coming from
  `--val-labels FILE`, else the devkit `ILSVRC2012_devkit_t12.tar.gz` beside them
  (its meta.mat needs scipy), else the list TFDS ships (for files named
  `ILSVRC2012_val_NNNNNNNN.JPEG`).

Which images a source holds, and their labels (indices into TFDS's sorted list of the
1000 wnids), is data/imagenet_source.py's. Each image is decoded with PIL, turned into
RGB (the real set has CMYK JPEGs, a PNG under a .JPEG name and grayscale images), optionally resized so
that its shorter side is exactly `resize`, and re-encoded as JPEG (an RGB JPEG needing
no resize is kept byte for byte). Examples are stored in a fixed pseudo-random order, so
that any prefix of a split (data.max_train, the holdout tail) mixes all classes.

The work is done in shards of `shard_size` examples over a process pool; a shard is
written under a temporary name and renamed when complete, and dataset_info.json is
written last, so a killed run resumes where it stopped (finished shards are kept) and a
half-written dataset is never taken for a prepared one.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import multiprocessing
import os
import pathlib
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import NamedTuple

from bnfree_jax.data.imagenet_source import (DEVKIT, NAME, TRAIN_TAR, VAL_TAR, Item, devkit_val_wnids,
                                             imagenet_builder, label_names, list_source, tfds_val_wnids)
from bnfree_jax.data.info import resolve_data_dir
from bnfree_jax.data.storage import is_remote, local_cache_dir, sync_tree

JPEG_QUALITY = 95
DEFAULT_SHARD_SIZE = 1024
STATE_FILE = "prepare_state.json"
FORMAT_VERSION = 1  # of what is written; a change makes older partial runs unresumable


# -------------------------------------------------------------------------- processing

_WORKER = {}


def _exit_with_parent(parent: int) -> None:
    """Ends this worker once its parent is gone: a pool worker whose parent was killed
    (-9) would otherwise wait on the task queue forever."""
    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def _init_pool_worker(parent: int, features, resize: int | None) -> None:
    _exit_with_parent(parent)
    _init_worker(features, resize)


def _init_worker(features, resize: int | None) -> None:
    """Per-process state: the serializer of the dataset's features, and the resize."""
    from tensorflow_datasets.core import example_serializer

    _close_files()
    _WORKER.clear()
    _WORKER.update(features=features, resize=resize, files={},
                   serializer=example_serializer.ExampleSerializer(features.get_serialized_info()))


def _close_files() -> None:
    for fd in _WORKER.get("files", {}).values():
        os.close(fd)
    _WORKER.pop("files", None)


def _read_bytes(item: Item) -> bytes:
    if item.offset < 0:
        return pathlib.Path(item.path).read_bytes()
    files = _WORKER["files"]
    if item.path not in files:
        files[item.path] = os.open(item.path, os.O_RDONLY)
    data = os.pread(files[item.path], item.size, item.offset)
    if len(data) != item.size:
        raise ValueError(f"{item.path}: {item.file_name} is truncated")
    return data


def shorter_side_size(width: int, height: int, side: int) -> tuple[int, int]:
    """(width, height) scaled so that the shorter one is exactly `side`."""
    scale = side / min(width, height)
    if width <= height:
        return side, max(1, round(height * scale))
    return max(1, round(width * scale)), side


def to_rgb_jpeg(raw: bytes, resize: int | None, where: str = "image") -> bytes:
    """JPEG bytes of an RGB version of any PIL-readable image (CMYK, grayscale, PNG...),
    its shorter side resized to `resize` if given; `raw` itself when it already is one."""
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(raw))
        target = shorter_side_size(*img.size, resize) if resize else img.size
        if img.format == "JPEG" and img.mode == "RGB" and target == img.size:
            return raw
        if img.format == "JPEG" and target != img.size:
            img.draft(img.mode, target)  # decode at a reduced DCT scale: much cheaper
        img = img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{where}: not a readable image ({exc})") from None
    if img.size != target:
        img = img.resize(target, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _encode_item(item: Item) -> bytes:
    """The serialized TFDS example of one source image."""
    where = item.path if item.offset < 0 else f"{item.path}:{item.file_name}"
    image = to_rgb_jpeg(_read_bytes(item), _WORKER["resize"], where)
    example = {"image": image, "label": item.label, "file_name": item.file_name}
    return _WORKER["serializer"].serialize_example(_WORKER["features"].encode_example(example))


# ----------------------------------------------------------------------------- writing

class _Shard(NamedTuple):
    split: str
    path: pathlib.Path
    items: list[Item]


def _shards(version_dir: pathlib.Path, plan: dict[str, list[Item]], shard_size: int) -> list[_Shard]:
    out = []
    for split, items in plan.items():
        chunks = [items[i:i + shard_size] for i in range(0, len(items), shard_size)]
        paths = _template(version_dir, split).sharded_filepaths(len(chunks))
        out += [_Shard(split, pathlib.Path(p), c) for p, c in zip(paths, chunks)]
    return out


def _template(version_dir: pathlib.Path, split: str):
    from tensorflow_datasets.core import naming

    return naming.ShardedFileTemplate(data_dir=version_dir, dataset_name=NAME, split=split,
                                      filetype_suffix="array_record")


def _finished(shard: _Shard) -> bool:
    """A shard under its final name holding all of its examples (it was renamed only
    after closing, so anything else is from another preparation)."""
    if not shard.path.is_file():
        return False
    from tensorflow_datasets.core import file_adapters

    try:
        return file_adapters.ArrayRecordFileAdapter.num_examples(shard.path) == len(shard.items)
    except Exception:  # noqa: BLE001 - unreadable: write it again
        return False


def _incomplete(path: pathlib.Path) -> pathlib.Path:
    return path.with_name(path.name + ".incomplete")


def _write_shard(shard: _Shard, records, advance) -> None:
    from array_record.python import array_record_module

    tmp = _incomplete(shard.path)
    writer = array_record_module.ArrayRecordWriter(str(tmp), "group_size:1")
    try:
        for record in records:
            writer.write(record)
            advance(shard.split)
    finally:
        writer.close()
    os.replace(tmp, shard.path)


def _state(plan: dict[str, list[Item]], resize: int | None, shard_size: int) -> dict:
    """What identifies a preparation: settings, and a digest of each split's examples."""
    splits = {}
    for split, items in plan.items():
        h = hashlib.sha256()
        for it in items:
            h.update(f"{it.file_name}\t{it.label}\n".encode())
        splits[split] = {"examples": len(items), "sha256": h.hexdigest()}
    return {"format": FORMAT_VERSION, "resize": resize, "jpeg_quality": JPEG_QUALITY,
            "shard_size": shard_size, "splits": splits}


def _write_json(path: pathlib.Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _check_resumable(version_dir: pathlib.Path, state: dict) -> bool:
    """True if `version_dir` already holds this very preparation, finished; raises if it
    holds another one (finished or not)."""
    path = version_dir / STATE_FILE
    done = (version_dir / "dataset_info.json").is_file()
    if not path.is_file():
        if done:
            raise ValueError(f"{version_dir} already holds a prepared {NAME} made otherwise; "
                             "remove it to prepare again")
        return False
    old = json.loads(path.read_text())
    if old != state:
        diff = sorted(k for k in state if old.get(k) != state[k])
        raise ValueError(f"{version_dir} holds a {'finished' if done else 'partial'} preparation "
                         f"with other {', '.join(diff)}; rerun with its settings and source, "
                         "or remove it")
    return done


def _write_dataset_info(builder, version_dir: pathlib.Path, plan: dict[str, list[Item]],
                        shards: list[_Shard]) -> None:
    """dataset_info.json (+ features, labels) from the shards, dataset_info.json last."""
    import tensorflow_datasets as tfds

    infos = []
    for split in plan:
        mine = [s for s in shards if s.split == split]
        infos.append(tfds.core.SplitInfo(
            name=split, shard_lengths=[len(s.items) for s in mine],
            num_bytes=sum(s.path.stat().st_size for s in mine),
            filename_template=_template(version_dir, split)))
    info = builder.info
    info.set_splits(tfds.core.SplitDict(infos))
    with tempfile.TemporaryDirectory(dir=version_dir, prefix=".info-") as tmp:
        info.write_to_directory(tmp)
        names = sorted(os.listdir(tmp), key=lambda n: n == "dataset_info.json")
        for name in names:
            os.replace(os.path.join(tmp, name), version_dir / name)


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True), disable=not enabled)


def _records(shards: list[_Shard], workers: int, features, resize):
    """(shard, serialized records) in order; with a pool, the next shard is already
    queued while one is written, so the workers never wait for the writer."""
    if workers <= 1:
        _init_worker(features, resize)
        try:
            for shard in shards:
                yield shard, map(_encode_item, shard.items)
        finally:
            _close_files()
        return
    ctx = multiprocessing.get_context("spawn")  # the parent holds threads (grain, jax)
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_pool_worker,
                               initargs=(os.getpid(), features, resize))
    try:
        queued = collections.deque()
        for shard in shards:
            queued.append((shard, pool.map(_encode_item, shard.items, chunksize=8)))
            if len(queued) > 1:
                yield queued.popleft()
        while queued:
            yield queued.popleft()
    finally:  # a stop does not wait for the queued images
        pool.shutdown(wait=True, cancel_futures=True)


def prepare_imagenet(source, data_dir=None, *, resize: int | None = None,
                     workers: int | None = None, val_labels=None,
                     shard_size: int = DEFAULT_SHARD_SIZE, progress: bool = True) -> dict:
    """Prepares `imagenet2012` under `data_dir` from the ILSVRC2012 `source` (see the
    module docstring); resumes a killed run. Returns what was done: the data dir, the
    examples per split, the shards written now and those kept from an earlier run."""
    if resize is not None and int(resize) < 1:
        raise ValueError(f"--resize must be a positive number of pixels, got {resize}")
    if int(shard_size) < 1:
        raise ValueError(f"--shard-size must be at least 1, got {shard_size}")
    workers = len(os.sched_getaffinity(0)) if workers is None else int(workers)
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    resize = None if resize is None else int(resize)
    root = resolve_data_dir(data_dir)
    if is_remote(root):  # written on this disk (shards resume here), then uploaded
        summary = prepare_imagenet(source, local_cache_dir("data", root), resize=resize, workers=workers,
                                   val_labels=val_labels, shard_size=shard_size, progress=progress)
        summary["uploaded"] = sync_tree(pathlib.Path(summary["data_dir"]) / NAME, root / NAME,
                                        log=lambda m: print(m, flush=True) if progress else None)
        summary["data_dir"] = str(root)
        return summary
    builder = imagenet_builder(root)
    version_dir = pathlib.Path(builder.data_dir)
    plan = list_source(source, val_labels, list(builder.info.features["label"].names))
    state = _state(plan, resize, int(shard_size))
    summary = {"data_dir": str(root), "examples": {s: len(v) for s, v in plan.items()},
               "shards_written": 0, "shards_kept": 0}
    shards = _shards(version_dir, plan, int(shard_size))
    if version_dir.is_dir() and _check_resumable(version_dir, state):
        summary["shards_kept"] = len(shards)
        return summary
    version_dir.mkdir(parents=True, exist_ok=True)
    for stale in version_dir.glob("*.incomplete"):
        stale.unlink()
    _write_json(version_dir / STATE_FILE, state)
    todo = [s for s in shards if not _finished(s)]
    pending = {s.path for s in todo}
    kept = [s for s in shards if s.path not in pending]
    summary["shards_kept"] = len(kept)
    with _progress(progress) as bar:
        tasks = {split: bar.add_task(f"{NAME} {split}", total=len(items),
                                     completed=sum(len(s.items) for s in kept if s.split == split))
                 for split, items in plan.items()}
        try:
            for shard, records in _records(todo, workers, builder.info.features, resize):
                _write_shard(shard, records, lambda split: bar.advance(tasks[split]))
                summary["shards_written"] += 1
        except BrokenProcessPool:
            raise RuntimeError("a worker process died (out of memory? try fewer --workers); "
                               "rerun to resume") from None
    _write_dataset_info(builder, version_dir, plan, shards)
    return summary


__all__ = ["DEVKIT", "TRAIN_TAR", "VAL_TAR", "Item", "label_names", "list_source", "prepare_imagenet",
           "shorter_side_size", "to_rgb_jpeg", "devkit_val_wnids", "tfds_val_wnids"]
