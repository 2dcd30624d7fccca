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

Labels are indices into TFDS's sorted list of the 1000 wnids, whatever subset of
classes the source holds. Each image is decoded with PIL, turned into RGB (the real set
has CMYK JPEGs, a PNG under a .JPEG name and grayscale images), optionally resized so
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
import re
import tarfile
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import NamedTuple

import numpy as np

from bnfree_jax.data.info import resolve_data_dir
from bnfree_jax.storage import is_remote, local_cache_dir, sync_tree

NAME = "imagenet2012"
TRAIN_TAR, VAL_TAR = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"
DEVKIT = "ILSVRC2012_devkit_t12.tar.gz"
DEVKIT_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
DEVKIT_META = "data/meta.mat"
JPEG_QUALITY = 95
DEFAULT_SHARD_SIZE = 1024
STATE_FILE = "prepare_state.json"
FORMAT_VERSION = 1  # of what is written; a change makes older partial runs unresumable
_VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.JPEG")
_ORDER_SEED = {"train": 0, "validation": 1}


class Item(NamedTuple):
    """One source image: a plain file (offset -1) or `size` bytes at `offset` in a tar."""

    file_name: str
    label: int
    path: str
    offset: int = -1
    size: int = -1


# ------------------------------------------------------------------------------ labels

def label_names() -> list[str]:
    """TFDS imagenet2012's 1000 wnids in label order (its ClassLabel names file)."""
    return list(_builder(None).info.features["label"].names)


def _builder(data_dir):
    import tensorflow_datasets as tfds

    return tfds.builder(NAME, data_dir=None if data_dir is None else str(data_dir),
                        file_format="array_record")


class _Labels:
    """wnid → label index, with a one-line error for a wnid outside the 1000."""

    def __init__(self, names: list[str]):
        self.index = {w: i for i, w in enumerate(names)}

    def __call__(self, wnid: str, where) -> int:
        if wnid not in self.index:
            raise ValueError(f"{where}: {wnid!r} is not one of the 1000 ImageNet classes")
        return self.index[wnid]


def devkit_val_wnids(devkit: pathlib.Path) -> list[str]:
    """The devkit's validation wnids, entry i for ILSVRC2012_val_{i+1:08d}.JPEG
    (ground-truth ILSVRC2012_IDs mapped to wnids through meta.mat)."""
    try:
        with tarfile.open(devkit) as tar:
            members = {m.name.split("/", 1)[-1]: m for m in tar.getmembers() if m.isfile()}
            missing = [p for p in (DEVKIT_TRUTH, DEVKIT_META) if p not in members]
            if missing:
                raise ValueError(f"{devkit} has no {' or '.join(missing)}")
            truth = tar.extractfile(members[DEVKIT_TRUTH]).read().decode().split()
            meta = tar.extractfile(members[DEVKIT_META]).read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ValueError(f"{devkit} is not a readable devkit archive ({exc})") from None
    try:
        import scipy.io
    except ImportError:
        raise ValueError(
            f"reading {devkit}'s {DEVKIT_META} needs scipy, which is not installed: "
            "`pip install scipy`, or give --val-labels FILE (one wnid per validation "
            "image, in file-name order)") from None
    try:
        synsets = scipy.io.loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"]
        wnid_of = {int(i): str(w) for i, w in zip(synsets["ILSVRC2012_ID"], synsets["WNID"])}
    except Exception as exc:  # noqa: BLE001 - scipy's errors for a damaged file vary
        raise ValueError(f"{devkit}: {DEVKIT_META} holds no readable synsets table ({exc})") from None
    unknown = sorted({t for t in truth if int(t) not in wnid_of})
    if unknown:
        raise ValueError(f"{devkit}: ground-truth ILSVRC2012_ID {unknown[0]} is not in {DEVKIT_META}")
    return [wnid_of[int(t)] for t in truth]


def tfds_val_wnids() -> list[str]:
    """The validation wnids TFDS ships (same order as the devkit's ground truth)."""
    import tensorflow_datasets as tfds

    return tfds.core.tfds_path("datasets/imagenet2012/validation_labels.txt").read_text().split()


def _by_number(names: list[str], wnids: list[str], origin: str) -> list[str]:
    """The wnid of each validation file, looked up by its ILSVRC2012_val number."""
    out = []
    for name in names:
        m = _VAL_NAME.fullmatch(name)
        if not m or not 1 <= int(m.group(1)) <= len(wnids):
            raise ValueError(f"validation image {name} is not an ILSVRC2012_val_NNNNNNNN.JPEG "
                             f"name within the {len(wnids)} of {origin}; give --val-labels FILE "
                             "(one wnid per validation image, in file-name order)")
        out.append(wnids[int(m.group(1)) - 1])
    return out


def _val_wnids(names: list[str], source: pathlib.Path, val_labels) -> list[str]:
    """The wnid of each of the (sorted) flat validation files `names`."""
    if val_labels:
        path = pathlib.Path(val_labels)
        if not path.is_file():
            raise FileNotFoundError(f"--val-labels {path} does not exist")
        wnids = path.read_text().split()
        if len(wnids) != len(names):
            raise ValueError(f"--val-labels {path} has {len(wnids)} wnids for the "
                             f"{len(names)} validation images")
        return wnids
    devkit = source / DEVKIT
    if devkit.is_file():
        return _by_number(names, devkit_val_wnids(devkit), str(devkit))
    return _by_number(names, tfds_val_wnids(), "TFDS's validation_labels.txt")


# ----------------------------------------------------------------------------- listing

def _is_image_name(name: str) -> bool:
    return not name.startswith(".")


def _class_dirs(root: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _list_class_dirs(root: pathlib.Path, labels: _Labels) -> list[Item]:
    """`root/<wnid>/<image>` files."""
    items = []
    for d in _class_dirs(root):
        label = labels(d.name, d)
        items += [Item(f.name, label, str(f)) for f in sorted(d.iterdir())
                  if f.is_file() and _is_image_name(f.name)]
    return items


def _list_train_tar(path: pathlib.Path, labels: _Labels) -> list[Item]:
    """The images of a tar of per-class `<wnid>.tar`, located by byte offset."""
    items = []
    with _open_tar(path) as outer:
        for member in outer:
            if not member.isfile():
                continue
            base = os.path.basename(member.name)
            if not base.endswith(".tar"):
                raise ValueError(f"{path}: member {member.name} is not a per-class <wnid>.tar")
            label = labels(base[:-4], f"{path}:{member.name}")
            with tarfile.open(fileobj=outer.extractfile(member), mode="r:") as inner:
                items += [Item(os.path.basename(m.name), label, str(path),
                               member.offset_data + m.offset_data, m.size)
                          for m in inner if m.isfile()]
    return items


def _list_flat_tar(path: pathlib.Path) -> list[Item]:
    with _open_tar(path) as tar:
        return [Item(os.path.basename(m.name), -1, str(path), m.offset_data, m.size)
                for m in tar if m.isfile()]


def _open_tar(path: pathlib.Path) -> tarfile.TarFile:
    try:
        return tarfile.open(path, mode="r:")
    except (tarfile.TarError, OSError) as exc:
        raise ValueError(f"{path} is not a readable uncompressed tar ({exc})") from None


def _train_items(source: pathlib.Path, labels: _Labels) -> list[Item] | None:
    if (source / "train").is_dir():
        return _list_class_dirs(source / "train", labels)
    if (source / TRAIN_TAR).is_file():
        return _list_train_tar(source / TRAIN_TAR, labels)
    return None


def _val_items(source: pathlib.Path, labels: _Labels, val_labels) -> list[Item] | None:
    root = source / "val"
    if root.is_dir() and _class_dirs(root):
        return _list_class_dirs(root, labels)
    if root.is_dir():
        flat = [Item(f.name, -1, str(f)) for f in sorted(root.iterdir())
                if f.is_file() and _is_image_name(f.name)]
    elif (source / VAL_TAR).is_file():
        flat = _list_flat_tar(source / VAL_TAR)
    else:
        return None
    flat.sort(key=lambda it: it.file_name)
    wnids = _val_wnids([it.file_name for it in flat], source, val_labels)
    where = root if root.is_dir() else source / VAL_TAR
    return [it._replace(label=labels(w, f"{where}:{it.file_name}")) for it, w in zip(flat, wnids)]


def list_source(source, val_labels=None, names: list[str] | None = None) -> dict[str, list[Item]]:
    """{'train': items, 'validation': items} of an ILSVRC2012 source, each split in its
    stored order (the file-name order, shuffled with a fixed seed)."""
    source = pathlib.Path(source).expanduser()
    if not source.is_dir():
        raise FileNotFoundError(f"--source {source} is not a directory")
    labels = _Labels(names if names is not None else label_names())
    splits = {"train": _train_items(source, labels),
              "validation": _val_items(source, labels, val_labels)}
    missing = [s for s, items in splits.items() if items is None]
    if missing:
        looked = {"train": f"train/<wnid>/*.JPEG or {TRAIN_TAR}",
                  "validation": f"val/<wnid>/*.JPEG, val/*.JPEG or {VAL_TAR}"}
        raise FileNotFoundError(f"{source} holds no ILSVRC2012 {' and '.join(missing)} images: "
                                f"looked for {'; '.join(looked[s] for s in missing)}")
    for split, items in splits.items():
        if not items:
            raise ValueError(f"{source}: the {split} split has no images")
        splits[split] = _stored_order(items, _ORDER_SEED[split])
    return splits


def _stored_order(items: list[Item], seed: int) -> list[Item]:
    """Sorted by file name then permuted with `seed`: the same for either layout."""
    items = sorted(items, key=lambda it: (it.file_name, it.label))
    dupes = [a.file_name for a, b in zip(items, items[1:]) if a.file_name == b.file_name]
    if dupes:
        raise ValueError(f"image file name {dupes[0]} occurs twice in one split")
    order = np.random.default_rng(seed).permutation(len(items))
    return [items[i] for i in order]


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
    builder = _builder(root)
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


__all__ = ["Item", "label_names", "list_source", "prepare_imagenet", "shorter_side_size",
           "to_rgb_jpeg", "devkit_val_wnids", "tfds_val_wnids"]
