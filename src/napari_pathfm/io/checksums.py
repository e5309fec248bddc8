"""Checksums of files written by one run and checked by a later one (batch markers, feature files)."""

from __future__ import annotations

import zlib
from pathlib import Path

__all__ = ["file_crc32"]


def file_crc32(path: str | Path, block: int = 1 << 20) -> str:
    """CRC-32 of a file's bytes as 8 hex digits, read in ``block``-byte pieces (any size of file).

    CRC-32 finds damage (truncation, flipped or zeroed bytes), not tampering; that is what a
    resumed run needs to know before it trusts an earlier output.
    """
    crc = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"
