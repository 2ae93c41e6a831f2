"""Checksums of checkpoint files: stored at save, verified at load.

A checkpoint that was written completely can still be damaged later (a disk or network-filesystem error, a copy
cut short, a flipped bit). A truncated zip usually fails to load, but flipped bytes inside a tensor's data load
without complaint and silently change the weights. So :func:`~maskrcnn.utils.checkpoint.save_checkpoint` computes
the SHA-256 of the bytes while they are written and stores it next to the file::

    model_0000020.pth          the checkpoint
    model_0000020.pth.sha256   "<64 hex digits>  model_0000020.pth\\n"   (the format of ``sha256sum``)

and :func:`verify_checksum` recomputes it before a checkpoint is loaded; ``sha256sum -c model_0000020.pth.sha256``
checks it by hand. A checkpoint without a checksum file (written by an older version, or copied without it) loads
unverified.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Optional

__all__ = ["CHECKSUM_SUFFIX", "HashingWriter", "checksum_path", "file_sha256", "read_checksum", "checksum_line",
           "verify_checksum", "ChecksumMismatch"]

CHECKSUM_SUFFIX = ".sha256"
_CHUNK = 1 << 20


class ChecksumMismatch(ValueError):
    """The file's SHA-256 differs from the one stored when it was written; the message names both files."""


class HashingWriter:
    """A binary file object that hashes every byte written through it (``torch.save`` only calls ``write``,
    ``flush`` and, for the fsync, ``fileno``)."""

    def __init__(self, f: Any):
        self._f = f
        self._hash = hashlib.sha256()

    def write(self, data) -> int:
        self._hash.update(data)
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()

    def fileno(self) -> int:
        return self._f.fileno()

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def checksum_path(path: str) -> str:
    """Where the checksum of ``path`` is stored."""
    return os.fspath(path) + CHECKSUM_SUFFIX


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def checksum_line(digest: str, path: str) -> bytes:
    """The checksum file's content (``sha256sum`` format, so that ``sha256sum -c`` reads it)."""
    return f"{digest}  {os.path.basename(path)}\n".encode("utf-8")


def read_checksum(path: str) -> Optional[str]:
    """The digest stored for ``path``, or None when it has no checksum file (or an unreadable one)."""
    try:
        with open(checksum_path(path), "r", encoding="utf-8") as f:
            text = f.read().split()
    except (OSError, UnicodeDecodeError):
        return None
    if not text or len(text[0]) != 64 or any(c not in "0123456789abcdef" for c in text[0].lower()):
        return None
    return text[0].lower()


def verify_checksum(path: str) -> Optional[bool]:
    """True when ``path`` matches its stored checksum, None when no checksum is stored.

    Raises:
        ChecksumMismatch: the file changed since it was written (corrupt or truncated).
    """
    expected = read_checksum(path)
    if expected is None:
        return None
    actual = file_sha256(path)
    if actual != expected:
        raise ChecksumMismatch(
            f"checkpoint {path} is truncated or corrupt: its SHA-256 is {actual[:16]}... but "
            f"{checksum_path(path)} recorded {expected[:16]}... when it was written ({os.path.getsize(path)} bytes "
            f"now); the file was damaged after it was saved")
    return True
