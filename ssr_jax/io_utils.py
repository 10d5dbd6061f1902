"""File-system helpers (a leaf: the standard library only)."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from typing import IO


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", *,
                 encoding: str | None = None,
                 suffix: str = ".tmp") -> Iterator[IO]:
    """Writes `path` all at once: yields a new temporary sibling (unique name
    ending in `suffix`, default permissions) open for writing, and renames
    it onto `path` (`os.replace`) when the block ends; on an exception the
    temporary file is removed and `path` is left as it was. Readers see the
    old file or the new one, never half of one.

    Args:
      path: the file to (re)write; its directory must exist.
      mode: "wb" or "w".
      encoding: for text mode.
      suffix: end of the temporary name (e.g. ".tmp.png").
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode={mode!r}: atomic_write writes; use 'w' or "
                         "'wb'")
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.{os.getpid()}-"
                               f"{uuid.uuid4().hex[:8]}{suffix}")
    try:
        with open(tmp, mode.replace("w", "x"), encoding=encoding) as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
