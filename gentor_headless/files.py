"""Files the client writes: whole or not at all (temp file + rename), with the mode ``open()`` would give."""
from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

DEFAULT_FILE_MODE = 0o666  # what open() creates, before the umask


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    """The process umask (read once: os.umask can only be read by setting it)."""
    current = os.umask(0o022)
    os.umask(current)
    return current


def write_atomic(path: Path, data: bytes, fsync: bool = False) -> None:
    """Write a file through a temp file + os.replace, so a stopped run never leaves half a file.

    The file gets the mode a plain ``open()`` would give it (0666 less the umask), not mkstemp's 0600.
    """
    fd, tmp = tempfile.mkstemp(prefix=".dl-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.chmod(tmp, DEFAULT_FILE_MODE & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
