"""File helpers shared by the data pipeline and checkpoints."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` via a temporary file renamed into place: a reader sees the old content
    or the new, never half of it."""
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def sha256_file(path: Path) -> str:
    """The file's sha256 (hex), read in 16 MiB blocks; `sha256sum` prints the same."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()
