"""Paths of a job that may be a bucket (``gs://…``) as well as a local folder.

A pod's workdir, data and artifact live in a bucket, and a path that may be remote must
never go through ``os.path``/``pathlib`` (``os.path.abspath('gs://b/w')`` is the local
folder ``gs:/b/w``).  Every path of a job is an ``etils.epath.Path`` made by
:func:`as_path`; what plain file systems do that object stores do not (an atomic rename,
an append, a directory move) has one function here with both ways.  Orbax and tensorstore
write checkpoints to ``gs://`` themselves; fsspec's ``gcsfs`` does the rest.  Pointing a
job at a GCS emulator: ``STORAGE_EMULATOR_HOST`` (gcsfs) and ``TENSORSTORE_GCS_HTTP_URL``
(orbax's tensorstore), both ``http://HOST:PORT``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from typing import Iterator

import fsspec
from etils import epath

Path = epath.Path
_CHUNK = 1 << 20

# Bucket listings are never cached: a step another host (or a killed run) wrote must be
# seen at once (fsspec's per-process listing cache would hide it from resume and
# from the other hosts).  A library default, set once, before any file system is made.
fsspec.config.conf.setdefault("gs", {}).setdefault("use_listings_cache", False)


def is_remote(path) -> bool:
    """Whether ``path`` names an object store (``gs://``, ``s3://``, …) rather than a local path."""
    return "://" in (path if isinstance(path, str) else os.fspath(path))


def as_path(path) -> epath.Path:
    """An ``epath.Path``: remote as given, local made absolute (``~`` expanded)."""
    text = path if isinstance(path, str) else os.fspath(path)
    if is_remote(text):
        return epath.Path(text)
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def _fs(path):
    """The fsspec file system and the bare object path of a remote ``path``."""
    return fsspec.core.url_to_fs(os.fspath(path))


def write_bytes_atomic(path, data: bytes) -> None:
    """Write a whole file so a crash never leaves half of it.

    Local: a temporary file beside it, fsync, rename.  Remote: one upload, which an
    object store makes visible whole or not at all."""
    path = as_path(path)
    if is_remote(path):
        path.write_bytes(data)
        return
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_text_atomic(path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def append_text(path, text: str) -> None:
    """Append ``text`` to a file, creating it.

    An object store cannot append (fsspec's ``"a"`` mode on gcsfs silently replaces the
    object), so remotely the text is uploaded as its own object and composed onto the
    file server-side: nothing already written is sent again."""
    path = as_path(path)
    if not is_remote(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as fh:
            fh.write(text)
        return
    if not path.exists():
        path.write_text(text)
        return
    fs, target = _fs(path)
    part = f"{target}.part-{uuid.uuid4().hex}"
    fs.pipe_file(part, text.encode())
    try:
        fs.merge(target, [target, part])
    finally:
        fs.rm(part)


def move(src, dst) -> None:
    """Rename a file or a folder (remotely: copy every object, then delete the source)."""
    src, dst = as_path(src), as_path(dst)
    if not is_remote(src):
        os.rename(src, dst)
        return
    fs, s = _fs(src)
    _, d = _fs(dst)
    if fs.isdir(s):
        for obj in fs.find(s):
            fs.copy(obj, d + obj[len(s):])
        fs.rm(s, recursive=True)
    else:
        fs.copy(s, d)
        fs.rm(s)


def remove(path) -> None:
    """Delete a file or a folder tree if it exists."""
    path = as_path(path)
    if path.is_dir():
        path.rmtree()
    elif path.exists():
        path.unlink()


def copy_tree(src, dst) -> None:
    """Copy a folder tree (either side local or remote)."""
    src, dst = as_path(src), as_path(dst)
    if not is_remote(src) and not is_remote(dst):
        shutil.copytree(src, dst)
        return
    for rel, path, _ in walk_files(src):
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        _copy_file(path, target)


def walk_files(root) -> Iterator[tuple[str, epath.Path, int]]:
    """``(relative name, path, size in bytes)`` of every file under ``root``, sorted (one
    listing of a bucket, not a request per file)."""
    root = as_path(root)
    if is_remote(root):
        fs, base = _fs(root)
        found = fs.find(base, detail=True)
        for obj in sorted(found):
            rel = obj[len(base):].lstrip("/")
            yield rel, root / rel, int(found[obj]["size"])
        return
    for dirpath, _, names in sorted(os.walk(root)):
        for name in sorted(names):
            full = os.path.join(dirpath, name)
            yield os.path.relpath(full, root), epath.Path(full), os.stat(full).st_size


def sync_tree(src, dst, log=None) -> int:
    """Copy every file of ``src`` that ``dst`` lacks or holds with another size (either side
    local or remote, streamed, each file whole or not at all); returns how many were copied.
    A killed copy resumes where it stopped."""
    src, dst = as_path(src), as_path(dst)
    copied = 0
    have = {rel: size for rel, _, size in walk_files(dst)} if dst.exists() else {}
    for rel, path, size in walk_files(src):
        target = dst / rel
        if have.get(rel) == size:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if log is not None:
            log(f"copying {path} -> {target} ({size / 2 ** 20:.1f} MiB)")
        _copy_file(path, target)
        copied += 1
    return copied


def _copy_file(src: epath.Path, dst: epath.Path) -> None:
    tmp = dst if is_remote(dst) else dst.with_name(f"{dst.name}.tmp{os.getpid()}")
    with src.open("rb") as fin, tmp.open("wb") as fout:
        shutil.copyfileobj(fin, fout, _CHUNK)
    if tmp != dst:
        os.replace(tmp, dst)


def file_sha256(path) -> str:
    """The hex sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with as_path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def local_cache_dir(kind: str, path) -> epath.Path:
    """A folder on this host's disk that stands for the remote ``path`` (``kind``: what it
    holds), under ``$BNFREE_CACHE`` or ``~/.cache/bnfree_jax``; stable across runs."""
    base = os.environ.get("BNFREE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "bnfree_jax")
    digest = hashlib.sha256(os.fspath(path).encode()).hexdigest()[:16]
    return epath.Path(base) / kind / digest
