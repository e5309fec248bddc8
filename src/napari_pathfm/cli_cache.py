"""``pathfm cache list|clear``: look at and empty the shared tile-embedding cache.

The cache itself is :mod:`napari_pathfm.tiles.embedding_cache`; segment, classify, features
and MIL prediction fill it and read from it (``--no-cache`` turns that off for one run).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

cache_app = typer.Typer(help="The shared tile-embedding cache (encoder outputs reused across runs).",
                        no_args_is_help=True)  # fmt: skip

_DIR_HELP = "Cache folder (default: $PATHFM_CACHE_DIR or ~/.napari-pathfm/cache)"


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


@cache_app.command("list")
def list_cmd(
    directory: Optional[Path] = typer.Option(None, "--dir", help=_DIR_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table"),
) -> None:
    """List cached entries (slide, encoder, tiles, size, last used; stale = the slide changed or is gone)."""
    from .tiles.embedding_cache import EmbeddingCache

    cache = EmbeddingCache(directory)
    entries = cache.entries()
    total = sum(e.bytes for e in entries)
    if as_json:
        typer.echo(json.dumps({"root": str(cache.root), "bytes": total, "max_bytes": cache.max_bytes,
                               "entries": [e.as_dict() for e in entries]}, indent=2))  # fmt: skip
        return
    typer.echo(f"{cache.root}: {len(entries)} entries, {_size(total)} of {_size(cache.max_bytes)}")
    for e in entries:
        flag = ("  (stale)" if e.stale else "") + (f"  ({e.declined})" if e.declined else "")
        d = e.as_dict()
        typer.echo(f"  {Path(e.slide).name}  {e.encoder}  {e.tiles} tiles  {_size(e.bytes)}  {d['last_used']}{flag}")


@cache_app.command("clear")
def clear_cmd(
    slide: Optional[Path] = typer.Option(None, "--slide", help="Only the entries of this slide file"),
    stale: bool = typer.Option(False, "--stale", help="Only entries whose slide changed or no longer exists"),
    directory: Optional[Path] = typer.Option(None, "--dir", help=_DIR_HELP),
) -> None:
    """Delete cached embeddings (all, one slide's, or the stale ones); entries being written are kept."""
    from .tiles.embedding_cache import EmbeddingCache

    removed = EmbeddingCache(directory).clear(slide, stale_only=stale)
    freed = sum(e.bytes for e in removed)
    typer.echo(f"removed {len(removed)} entries, {_size(freed)}")
