"""The ILSVRC2012 source of `bnfree prepare imagenet2012`: which images it holds and
their labels, in either layout (extracted folders or the original archives).

Labels are indices into TFDS's sorted list of the 1000 wnids, whatever subset of classes
the source holds; validation labels come from the folder names, `--val-labels FILE`, the
devkit or the list TFDS ships.  Each split is returned in a fixed pseudo-random order, so
any prefix of a split mixes all classes.  Reading the images is the writer's
(data/imagenet.py).
"""

from __future__ import annotations

import io
import os
import pathlib
import re
import tarfile
from typing import NamedTuple

import numpy as np

NAME = "imagenet2012"
TRAIN_TAR, VAL_TAR = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"
DEVKIT = "ILSVRC2012_devkit_t12.tar.gz"
DEVKIT_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
DEVKIT_META = "data/meta.mat"
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
    return list(imagenet_builder(None).info.features["label"].names)


def imagenet_builder(data_dir):
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
