"""Small files and folders under a storage path that is a local folder or a URI (``s3://``, ``gs://``, ...).

A URI goes through ``pyarrow.fs.FileSystem.from_uri``, exactly as Ray Train and Tune resolve ``storage_path``
(``ray.train.v2._internal.execution.storage.get_fs_and_path``), so what Ray can write, these helpers can read:
the endpoint and credentials come from the environment the same way (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, ``AWS_PROFILE``, ``GOOGLE_APPLICATION_CREDENTIALS``...). A local
path is used as it is, with ``pathlib``, so local behaviour does not depend on pyarrow.

Ray reports a checkpoint's location as a path *on its file system*, without the scheme (``Checkpoint.path`` of an
``s3://bucket/p`` storage is ``bucket/p/...``); pass the storage path as ``root`` to read such a path.
"""

from __future__ import annotations

import contextlib
import posixpath
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def is_uri(path: str | Path) -> bool:
    """True for ``scheme://...`` (object stores, ``file://``), False for a plain local path."""
    return "://" in str(path)


def join(base: str | Path, *parts: str) -> str:
    """``base/part/...`` with ``/`` for a URI (``Path`` would turn ``s3://b`` into ``s3:/b``), ``os.path`` locally."""
    if is_uri(base):
        return posixpath.join(str(base).rstrip("/"), *parts)
    return str(Path(base, *parts))


def filesystem(path: str | Path, root: str | Path | None = None):
    """``(pyarrow FileSystem, path on it)`` of ``path``: a URI, a path on ``root``'s file system when ``root`` is a
    URI and ``path`` is not (Ray's prefix-stripped checkpoint paths), else a local path."""
    import pyarrow.fs

    if is_uri(path):
        return pyarrow.fs.FileSystem.from_uri(str(path))
    if root is not None and is_uri(root):
        return pyarrow.fs.FileSystem.from_uri(str(root))[0], str(path)
    return pyarrow.fs.LocalFileSystem(), str(Path(path).resolve())


def read_text(path: str | Path) -> str | None:
    """The text of the file at ``path``; None when there is none."""
    if not is_uri(path):
        return Path(path).read_text() if Path(path).is_file() else None
    import pyarrow.fs

    fs, p = filesystem(path)
    if fs.get_file_info(p).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(p) as f:
        return f.read().decode()


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` whole: locally through a temporary file and a rename, remotely with one PUT
    (an object store never shows a half-written object)."""
    if not is_uri(path):
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(target)
        return
    fs, p = filesystem(path)
    fs.create_dir(posixpath.dirname(p), recursive=True)
    with fs.open_output_stream(p) as f:
        f.write(text.encode())


@contextlib.contextmanager
def local_dir(dest: str | Path) -> Iterator[Path]:
    """A local folder whose files end up in ``dest``: ``dest`` itself when local, else a temporary folder that is
    uploaded to ``dest`` when the block ends without an error (and deleted either way)."""
    if not is_uri(dest):
        Path(dest).mkdir(parents=True, exist_ok=True)
        yield Path(dest)
        return
    with tempfile.TemporaryDirectory(prefix="malora-upload-") as tmp:
        yield Path(tmp)
        upload_dir(tmp, dest)


def upload_dir(local: str | Path, dest: str | Path) -> None:
    """Copy the local folder ``local`` into ``dest`` (a URI or a local folder), overwriting files of the same name."""
    import pyarrow.fs

    fs, p = filesystem(dest)
    fs.create_dir(p, recursive=True)
    # single-threaded upload: pyarrow's threaded S3 upload can hang (apache/arrow#32372; Ray does the same)
    pyarrow.fs.copy_files(str(Path(local).resolve()), p, destination_filesystem=fs, use_threads=False)


@contextlib.contextmanager
def local_copy(path: str | Path, root: str | Path | None = None) -> Iterator[Path | None]:
    """The folder ``path`` (see :func:`filesystem` for ``root``) as a local folder for the block: the folder itself
    when local, else a temporary download deleted afterwards; None when there is no such folder."""
    if not is_uri(path) and not (root is not None and is_uri(root)):
        yield Path(path) if Path(path).is_dir() else None
        return
    import pyarrow.fs

    fs, p = filesystem(path, root)
    if fs.get_file_info(p).type != pyarrow.fs.FileType.Directory:
        yield None
        return
    tmp = tempfile.mkdtemp(prefix="malora-download-")
    try:
        pyarrow.fs.copy_files(p, tmp, source_filesystem=fs)
        yield Path(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
