"""Reading text files a user wrote (manifests, recipes) as UTF-8, naming the line when they are not."""

from __future__ import annotations

from pathlib import Path

from ..errors import FileProblem

__all__ = ["read_utf8"]


def read_utf8(path: str | Path, error: type[FileProblem], fix: str) -> str:
    """The text of ``path`` decoded as UTF-8 (a byte-order mark, as Excel writes, is dropped).

    Another encoding (Latin-1, Windows-1252 ...) raises ``error(path, problem, fix)`` naming the line
    of the first byte UTF-8 cannot decode, so the user knows it is the encoding and where.
    """
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise error(
            path,
            f"is not UTF-8 text: line {line} has a byte (0x{data[exc.start]:02x}) that UTF-8 cannot decode "
            "(the file was probably saved as Latin-1 or Windows-1252).",
            fix,
        ) from None
