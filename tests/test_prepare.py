"""`bnfree prepare imagenet2012`: a miniature ILSVRC2012 (4 real classes, with the real
set's odd images) in both layouts, prepared and read back through the data sources."""

import io
import os
import pathlib
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from data_fixtures import (IMAGENET_PER_CLASS, WNIDS, encode_quirk, imagenet_miniature,  # noqa: E402
                           tiny_images, write_imagenet_extracted)

from bnfree_jax import data  # noqa: E402
from bnfree_jax.data import imagenet  # noqa: E402

N_TRAIN, N_VAL = IMAGENET_PER_CLASS
RESIZE = 32
MINI = imagenet_miniature()


def _add(tar: tarfile.TarFile, name: str, raw: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(raw)
    tar.addfile(info, io.BytesIO(raw))


def write_tars(root: pathlib.Path) -> pathlib.Path:
    """The original archives (train: a tar of per-class tars), val listed out of order."""
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(root / imagenet.TRAIN_TAR, "w") as outer:
        for wnid in WNIDS:
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as inner:
                for name, w, _, _, raw in MINI["train"]:
                    if w == wnid:
                        _add(inner, name, raw)
            _add(outer, f"{wnid}.tar", buf.getvalue())
    with tarfile.open(root / imagenet.VAL_TAR, "w") as tar:
        for name, _, _, _, raw in reversed(MINI["validation"]):
            _add(tar, name, raw)
    return root


def write_val_labels(path: pathlib.Path) -> pathlib.Path:
    path.write_text("".join(f"{w}\n" for _, w, _, _, _ in sorted(MINI["validation"])))
    return path


def _raw_records(data_dir, split):
    """Every stored example with its file name, read with tfds itself."""
    import tensorflow_datasets as tfds

    src = tfds.data_source("imagenet2012", split=split, data_dir=str(data_dir), download=False)
    return [src[i] for i in range(len(src))]


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _expected(split):
    return {name: (WNIDS[wnid], img, kind) for name, wnid, img, kind, _ in MINI[split]}


def _prepare(source, data_dir, **kw):
    kw.setdefault("resize", RESIZE)
    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    return imagenet.prepare_imagenet(source, data_dir, **kw)


def _check_split(data_dir, split, resize=RESIZE):
    """Every source image once, with its true 1000-class label and its pixels (RGB)."""
    expected = _expected(split)
    records = _raw_records(data_dir, split)
    names = [_text(r["file_name"]) for r in records]
    assert sorted(names) == sorted(expected)  # none lost, none twice
    for name, r in zip(names, records):
        label, img, kind = expected[name]
        assert int(r["label"]) == label, name
        got = np.asarray(r["image"])
        assert got.dtype == np.uint8 and got.ndim == 3 and got.shape[2] == 3, (name, got.shape)
        if resize:
            assert min(got.shape[:2]) == resize, (name, got.shape)
            h, w = img.shape[:2]
            assert abs(got.shape[0] / got.shape[1] - h / w) < 0.06, name  # aspect kept
            ref = np.asarray(Image.fromarray(img).resize(got.shape[1::-1], Image.BICUBIC))
        else:
            assert got.shape == img.shape, name
            ref = img
        if kind == "gray":
            assert (got.max(-1).astype(int) - got.min(-1)).max() <= 2, name  # R = G = B
            ref = np.asarray(Image.fromarray(img).convert("L").convert("RGB")
                             .resize(got.shape[1::-1], Image.BICUBIC))
        err = np.abs(got.astype(int) - ref.astype(int)).mean()
        assert err < 12, (name, kind, err)  # colours right (a CMYK file not inverted)
    return names


def test_extracted_layout_with_a_pool(tmp_path):
    src = write_imagenet_extracted(tmp_path / "src")
    done = _prepare(src, tmp_path / "d", workers=2, shard_size=5)
    assert done["examples"] == {"train": 12, "validation": 8}
    assert (done["shards_written"], done["shards_kept"]) == (3 + 2, 0)
    train_names = _check_split(tmp_path / "d", "train")
    _check_split(tmp_path / "d", "validation")
    # a fixed mixed order, not class after class: a prefix holds several classes
    assert train_names != sorted(train_names)
    assert len({n.split("_")[0] for n in train_names[:N_TRAIN]}) > 1


def test_tars_give_the_same_dataset_as_the_extracted_layout(tmp_path):
    ext = _prepare(write_imagenet_extracted(tmp_path / "ext"), tmp_path / "d1", shard_size=4)
    src = write_tars(tmp_path / "tars")
    tar = _prepare(src, tmp_path / "d2", shard_size=4,
                   val_labels=write_val_labels(tmp_path / "labels.txt"))
    assert ext["examples"] == tar["examples"]
    for split in ("train", "validation"):
        _check_split(tmp_path / "d2", split)
        a, b = _raw_records(tmp_path / "d1", split), _raw_records(tmp_path / "d2", split)
        assert [(_text(r["file_name"]), int(r["label"])) for r in a] == \
            [(_text(r["file_name"]), int(r["label"])) for r in b]
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x["image"], y["image"])


def test_no_resize_keeps_sizes_and_rgb_jpeg_bytes(tmp_path):
    src = write_imagenet_extracted(tmp_path / "src")
    _prepare(src, tmp_path / "d", resize=None, shard_size=100)
    _check_split(tmp_path / "d", "train", resize=None)
    raw = {kind: b for _, _, _, kind, b in MINI["train"]}
    assert imagenet.to_rgb_jpeg(raw["rgb"], None) is raw["rgb"]  # kept byte for byte
    for kind in ("cmyk", "png", "gray"):
        again = imagenet.to_rgb_jpeg(raw[kind], None)
        assert again != raw[kind] and Image.open(io.BytesIO(again)).format == "JPEG"


def test_read_back_through_the_jobs_sources_and_iterators(tmp_path):
    _prepare(write_imagenet_extracted(tmp_path / "src"), tmp_path / "d", shard_size=3)
    train = data.get_source("imagenet2012", "train", tmp_path / "d")
    val = data.get_source("imagenet2012", "test", tmp_path / "d")  # the validation split
    assert (len(train), len(val)) == (12, 8)
    assert sorted(int(train[i]["label"]) for i in range(12)) == sorted(list(WNIDS.values()) * 3)
    assert min(train[0]["image"].shape[:2]) == RESIZE and train[0]["image"].shape[2] == 3
    it = data.train_iterator(train, global_batch=4, seed=0, augment="imagenet", image_size=24,
                             process_index=0, process_count=1)
    batches = [next(it) for _ in range(3)]  # one epoch
    assert all(b["image"].shape == (4, 24, 24, 3) and b["image"].dtype == np.uint8 for b in batches)
    assert sorted(np.concatenate([b["label"] for b in batches]).tolist()) == sorted(list(WNIDS.values()) * 3)
    evals = list(data.eval_batches(val, batch_size=3, image_size=24, process_index=0, process_count=1))
    assert [b["mask"].tolist() for b in evals] == [[1, 1, 1], [1, 1, 1], [1, 1, 0]]
    got = sorted(int(b["label"][k]) for b in evals for k in range(3) if b["mask"][k])
    assert got == sorted(list(WNIDS.values()) * 2)


def test_a_killed_run_resumes_shard_by_shard(tmp_path, monkeypatch):
    src, out = write_imagenet_extracted(tmp_path / "src"), tmp_path / "d"
    real = imagenet._encode_item
    calls = []

    def dies_at_the_ninth(item):
        calls.append(item.file_name)
        if len(calls) == 9:
            raise KeyboardInterrupt  # killed in the middle of the third train shard
        return real(item)

    monkeypatch.setattr(imagenet, "_encode_item", dies_at_the_ninth)
    with pytest.raises(KeyboardInterrupt):
        _prepare(src, out, shard_size=4)
    version = out / "imagenet2012" / "5.1.0"
    finished = sorted(version.glob("*-train.array_record-*-of-*[0-9]"))
    assert len(finished) == 2 and len(list(version.glob("*.incomplete"))) == 1
    with pytest.raises(FileNotFoundError):  # half a dataset is not taken for a prepared one
        data.get_source("imagenet2012", "train", out)
    stamps = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in finished}

    calls.clear()
    monkeypatch.setattr(imagenet, "_encode_item", lambda item: (calls.append(item.file_name), real(item))[1])
    done = _prepare(src, out, shard_size=4)
    assert (done["shards_written"], done["shards_kept"]) == (1 + 2, 2)
    assert len(calls) == 20 - 8  # the two finished shards were not redone
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in finished} == stamps
    assert not list(version.glob("*.incomplete"))
    _check_split(out, "train")  # every example exactly once
    _check_split(out, "validation")

    calls.clear()
    again = _prepare(src, out, shard_size=4)
    assert (again["shards_written"], again["shards_kept"], calls) == (0, 5, [])
    with pytest.raises(ValueError, match="other resize"):
        _prepare(src, out, shard_size=4, resize=RESIZE + 1)


def _children(pid: int) -> list[int]:
    """The pool workers of `pid` (its children other than multiprocessing's resource tracker)."""
    out = []
    for d in pathlib.Path("/proc").iterdir():
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if d.name.isdigit() and int(stat.rsplit(")", 1)[1].split()[1]) == pid \
                and b"resource_tracker" not in cmd:
            out.append(int(d.name))
    return out


def _alive(pid: int) -> bool:
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not pathlib.Path("/proc/self/stat").exists(), reason="reads /proc")
def test_a_sigkilled_cli_run_resumes(tmp_path):
    """A real kill (-9) of `bnfree prepare` with a pool: its workers end too, the rerun
    keeps every finished shard, and the dataset has each image once."""
    import signal
    import subprocess
    import time

    src, out = tmp_path / "src", tmp_path / "d"
    for split, folder, n in (("train", "train", 60), ("validation", "val", 2)):
        for k, img in enumerate(tiny_images(len(WNIDS) * n, seed=7)):
            wnid = list(WNIDS)[k % len(WNIDS)]
            (src / folder / wnid).mkdir(parents=True, exist_ok=True)
            (src / folder / wnid / f"{wnid}_{split}_{k}.JPEG").write_bytes(encode_quirk(img, "rgb"))
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(data.__file__).parents[2])}
    proc = subprocess.Popen([sys.executable, "-m", "bnfree_jax.cli", "prepare", "imagenet2012",
                             "--source", str(src), "--data-dir", str(out), "--resize", "24",
                             "--workers", "2", "--shard-size", "4"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    version = out / "imagenet2012" / "5.1.0"
    deadline = time.time() + 60
    while not list(version.glob("*.array_record-*[0-9]")) and time.time() < deadline:
        time.sleep(0.005)
    workers = _children(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(workers) == 2
    deadline = time.time() + 10
    while any(_alive(p) for p in workers) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in workers), "orphaned pool workers"
    assert not (version / "dataset_info.json").exists()
    finished = {p: p.stat().st_mtime_ns for p in version.glob("*.array_record-*[0-9]")}
    assert 0 < len(finished) < 62
    done = _prepare(src, out, resize=24, shard_size=4)
    assert done["shards_kept"] == len(finished) and done["shards_written"] == 62 - len(finished)
    assert {p: p.stat().st_mtime_ns for p in finished} == finished
    for split, n in (("train", 240), ("validation", 8)):
        names = [_text(r["file_name"]) for r in _raw_records(out, split)]
        assert len(names) == len(set(names)) == n


def test_devkit_validation_labels(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    src = write_tars(tmp_path / "tars")
    # devkit ILSVRC2012_IDs are not in sorted-wnid order: ID 1 is the last of our wnids
    ids = {"n04596742": 1, "n01751748": 2, "n01440764": 3, "n01443537": 4, "n09999999": 1001}
    synsets = np.array([(i, w) for w, i in ids.items()],
                       dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O")])
    meta = io.BytesIO()
    scipy_io.savemat(meta, {"synsets": synsets})
    truth = "".join(f"{ids[w]}\n" for _, w, _, _, _ in MINI["validation"])
    with tarfile.open(src / imagenet.DEVKIT, "w:gz") as tar:
        _add(tar, "ILSVRC2012_devkit_t12/data/meta.mat", meta.getvalue())
        _add(tar, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", truth.encode())
    _prepare(src, tmp_path / "d", shard_size=100)
    _check_split(tmp_path / "d", "validation")


def test_without_scipy_the_devkit_error_names_val_labels(tmp_path, monkeypatch):
    src = write_tars(tmp_path / "tars")
    with tarfile.open(src / imagenet.DEVKIT, "w:gz") as tar:
        _add(tar, "ILSVRC2012_devkit_t12/data/meta.mat", b"not read")
        _add(tar, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", b"1\n")
    monkeypatch.setitem(sys.modules, "scipy", None)
    monkeypatch.setitem(sys.modules, "scipy.io", None)
    with pytest.raises(ValueError, match="needs scipy.*--val-labels"):
        _prepare(src, tmp_path / "d")
    _prepare(src, tmp_path / "d", val_labels=write_val_labels(tmp_path / "labels.txt"))
    _check_split(tmp_path / "d", "validation")


def test_tfds_validation_list_labels_real_file_names(tmp_path):
    """With neither devkit nor --val-labels, a real validation file gets its TFDS label:
    ILSVRC2012_val_00000001 is a sea snake, n01751748, label 65."""
    src = tmp_path / "src"
    write_imagenet_extracted(src)
    import shutil

    shutil.rmtree(src / "val")
    (src / "val").mkdir()
    for name, _, _, _, raw in MINI["validation"][:3]:
        (src / "val" / name).write_bytes(raw)  # flat, as the val tar unpacks
    _prepare(src, tmp_path / "d", shard_size=100)
    records = {_text(r["file_name"]): int(r["label"]) for r in _raw_records(tmp_path / "d", "validation")}
    wnids = imagenet.tfds_val_wnids()
    names = imagenet.label_names()
    assert names[65] == "n01751748" and records["ILSVRC2012_val_00000001.JPEG"] == 65
    assert records == {f"ILSVRC2012_val_{k:08d}.JPEG": names.index(wnids[k - 1])
                       for k in (1, 2, 3)}


def test_label_order_is_the_sorted_1000_wnids():
    names = imagenet.label_names()
    assert len(names) == 1000 and names == sorted(names) and len(set(names)) == 1000
    assert {w: names.index(w) for w in WNIDS} == WNIDS


def test_shorter_side_size():
    assert imagenet.shorter_side_size(400, 300, 32) == (43, 32)
    assert imagenet.shorter_side_size(300, 400, 32) == (32, 43)
    assert imagenet.shorter_side_size(10, 10, 32) == (32, 32)  # small images are enlarged


# ------------------------------------------------------------------------- bad input

def _cli(*argv):
    from bnfree_jax.cli import main

    return main(["prepare", "imagenet2012", *map(str, argv)])


def test_a_source_of_neither_layout_is_one_line_and_status_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as stop:
        _cli("--source", tmp_path / "empty", "--data-dir", tmp_path / "d")
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1, err
    for looked_for in ("train/<wnid>/", imagenet.TRAIN_TAR, "val/<wnid>/", imagenet.VAL_TAR):
        assert looked_for in err
    assert not (tmp_path / "d").exists()


def test_the_cli_prepares_and_says_so(tmp_path, capsys):
    src = write_tars(tmp_path / "tars")
    labels = write_val_labels(tmp_path / "labels.txt")
    args = ("--source", src, "--data-dir", tmp_path / "d", "--resize", RESIZE, "--workers", 1,
            "--val-labels", labels, "--shard-size", 8)
    assert _cli(*args) == 0
    out = capsys.readouterr().out
    assert "train 12, validation 8" in out and "3 shards written" in out
    assert len(data.get_source("imagenet2012", "test", tmp_path / "d")) == 8
    assert _cli(*args) == 0 and "already prepared" in capsys.readouterr().out


@pytest.mark.parametrize("damage, message", [
    ("unknown_wnid", "'n99999999' is not one of the 1000 ImageNet classes"),
    ("no_val_labels", "--val-labels FILE"),
    ("short_val_labels", "has 7 wnids for the 8 validation images"),
    ("not_an_image", "not a readable image"),
    ("prepared_otherwise", "made otherwise"),
])
def test_bad_input_is_one_line(tmp_path, damage, message):
    src = write_imagenet_extracted(tmp_path / "src")
    kw = {}
    if damage == "unknown_wnid":
        (src / "train" / "n99999999").mkdir()
    elif damage in ("no_val_labels", "short_val_labels"):
        src = write_tars(tmp_path / "tars")
        with tarfile.open(src / imagenet.VAL_TAR, "w") as tar:  # names TFDS's list can't key
            for k, (_, _, _, _, raw) in enumerate(MINI["validation"]):
                _add(tar, f"val_{k}.JPEG", raw)
        if damage == "short_val_labels":
            kw["val_labels"] = tmp_path / "labels.txt"
            kw["val_labels"].write_text("n01440764\n" * 7)
    elif damage == "not_an_image":
        (src / "train" / "n01440764" / "n01440764_9.JPEG").write_bytes(b"truncated")
    elif damage == "prepared_otherwise":
        from data_fixtures import write_tiny_imagenet

        write_tiny_imagenet(tmp_path / "d", n_train=2, n_val=1)
    with pytest.raises((ValueError, FileNotFoundError)) as exc:
        _prepare(src, tmp_path / "d", **kw)
    assert message in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("setting, message", [
    ({"resize": 0}, "--resize must be a positive"),
    ({"workers": 0}, "--workers must be at least 1"),
    ({"shard_size": 0}, "--shard-size must be at least 1"),
])
def test_bad_settings_are_refused_before_any_work(tmp_path, setting, message):
    with pytest.raises(ValueError, match=message):
        _prepare(write_imagenet_extracted(tmp_path / "src"), tmp_path / "d", **setting)
    assert not (tmp_path / "d").exists()
