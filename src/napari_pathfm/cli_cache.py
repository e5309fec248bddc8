"""``pathfm cache list|verify|clear``: look at, check and empty the shared tile-embedding cache.

The cache itself is :mod:`napari_pathfm.tiles.embedding_cache`; segment, classify, features
and MIL prediction fill it and read from it (``--no-cache`` turns that off for one run).
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

cache_app = typer.Typer(
    help="The shared tile-embedding cache (encoder outputs reused across runs).", no_args_is_help=True
)

_DIR_HELP = "Cache folder (default: $PATHFM_CACHE_DIR or ~/.napari-pathfm/cache)"


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


@cache_app.command("list")
def list_cmd(
    directory: Path | None = typer.Option(None, "--dir", help=_DIR_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table"),
) -> None:
    """List cached entries (slide, encoder, tiles, size, last used, health; stale = the slide changed or is gone).

    Health here comes from a cheap check (index, row table, chunk files present at full size): entries
    that pass it are "unverified"; `pathfm cache verify` reads and checks every row."""
    from .tiles.embedding_cache import EmbeddingCache

    cache = EmbeddingCache(directory)
    entries = cache.entries()
    total = sum(e.bytes for e in entries)
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "root": str(cache.root),
                    "bytes": total,
                    "max_bytes": cache.max_bytes,
                    "entries": [e.as_dict() for e in entries],
                },
                indent=2,
            )
        )
        return
    typer.echo(f"{cache.root}: {len(entries)} entries, {_size(total)} of {_size(cache.max_bytes)}")
    for e in entries:
        _echo_entry(e)


def _echo_entry(e) -> None:
    """One line per entry: slide, encoder, tiles, size, last used, health (damage in red)."""
    flag = ("  (stale)" if e.stale else "") + (f"  ({e.declined})" if e.declined and e.health != "declined" else "")
    status = e.status() if e.health != "declined" else f"declined ({e.declined})"
    line = f"  {Path(e.slide).name}  {e.encoder}  {e.tiles} tiles  {_size(e.bytes)}  {e.as_dict()['last_used']}"
    typer.echo(line + "  ", nl=False)
    typer.secho(status, fg=None if e.ok else typer.colors.RED, nl=False)
    typer.echo(flag)


@cache_app.command("verify")
def verify_cmd(
    repair: bool = typer.Option(
        False,
        "--repair",
        help="Drop damaged tiles (the next run recomputes them) and remove unreadable or old-format entries",
    ),
    directory: Path | None = typer.Option(None, "--dir", help=_DIR_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table"),
) -> None:
    """Read and check every row of every entry: healthy, damaged (N tiles), partial, declined, stale,
    unreadable. Exit code 1 while damage remains (run with --repair), else 0."""
    from .tiles.embedding_cache import EmbeddingCache

    cache = EmbeddingCache(directory)
    paths = sorted(cache.root.glob("*/*.zarr")) if cache.root.is_dir() else []
    entries = [cache.inspect(p, full=True, repair=repair) for p in paths]
    bad = [e for e in entries if not e.ok]
    if as_json:
        typer.echo(
            json.dumps({"root": str(cache.root), "ok": not bad, "entries": [e.as_dict() for e in entries]}, indent=2)
        )
    else:
        typer.echo(f"{cache.root}: {len(entries)} entries checked, {len(bad)} with damage")
        for e in entries:
            _echo_entry(e)
        if bad and not repair:
            typer.echo("run `pathfm cache verify --repair` to drop the damaged tiles (they are recomputed when needed)")
    raise typer.Exit(1 if bad else 0)


@cache_app.command("clear")
def clear_cmd(
    slide: Path | None = typer.Option(None, "--slide", help="Only the entries of this slide file"),
    stale: bool = typer.Option(False, "--stale", help="Only entries whose slide changed or no longer exists"),
    directory: Path | None = typer.Option(None, "--dir", help=_DIR_HELP),
) -> None:
    """Delete cached embeddings (all, one slide's, or the stale ones); entries being written are kept."""
    from .tiles.embedding_cache import EmbeddingCache

    removed = EmbeddingCache(directory).clear(slide, stale_only=stale)
    freed = sum(e.bytes for e in removed)
    typer.echo(f"removed {len(removed)} entries, {_size(freed)}")
