"""Atomic outputs: a file or directory appears whole under its final name, or not at all.

Everything a run writes (results.csv, config.json, masks.npz, exports) goes through here, so a
crash leaves either the previous or the new version readable. A file is replaced by one rename;
a directory by two (old aside, new in), so for the instant between them only the aside copy
(`.old-*` next to it) exists. Outputs get the usual permissions (0666/0777 less the umask), not
the private ones of temporary files.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def open_atomic(path: str, mode: str = "w") -> Iterator:
    """`with open_atomic(p) as f: f.write(...)`: written to a temporary file, fsynced, renamed."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str, keep_old_as: str | None = None) -> Iterator[str]:
    """`with atomic_dir(p) as tmp: <write into tmp>`: tmp replaces p when the block succeeds;
    the version it replaces is deleted, or with `keep_old_as` becomes that directory."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=".old-", dir=parent)
            os.rmdir(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old and keep_old_as:
            if os.path.exists(keep_old_as):
                shutil.rmtree(keep_old_as)
            os.replace(old, keep_old_as)
        elif old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
