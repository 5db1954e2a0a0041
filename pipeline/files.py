"""Writing a run's files so that a crash, a full disk or a kill never leaves half a file behind.

Every file a run keeps (checkpoint shards and manifests, summary.json, weights.pt) is written to a
temporary file beside its final name, flushed to the disk (fsync), then renamed over the final name,
and the directory entry is flushed too: a reader, or a run resumed after a power cut, sees either
the old file or the whole new one. A failed write (no space left, a file-size limit, a read-only
file system) raises :class:`WriteError`, naming the file, and removes the temporary file; whatever
was there before is untouched.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from forwardflow.pipeline.messages import WriteError

FILE_MODE = 0o644  # a run's outputs are read by other users' tools (plots, Prometheus file_sd, ...)


def fsync_directory(directory: Path) -> None:
    """Flush a directory's entries (a rename is durable only once its directory is)."""
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Call ``write(temporary_name)``, then make that file ``path`` atomically and durably."""
    path = Path(path)
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".")
        os.close(handle)
        write(temporary)
        with open(temporary, "rb+") as written:
            os.fsync(written.fileno())
        os.chmod(temporary, FILE_MODE)  # mkstemp makes 0600
        os.replace(temporary, path)
        temporary = None
        fsync_directory(path.parent)
    except OSError as error:
        raise WriteError(str(path), error.strerror or str(error)) from None
    finally:
        if temporary is not None:
            with contextlib.suppress(OSError):
                os.unlink(temporary)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda name: Path(name).write_bytes(data))
