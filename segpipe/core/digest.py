"""Content digests of files, read in chunks (inputs can be gigabytes)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_digest(path: str | Path, algorithm: str, chunk: int = 1 << 20) -> str:
    """The hex digest of ``path``'s bytes with ``hashlib``'s ``algorithm`` (``sha1``, ``sha256``, …)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
