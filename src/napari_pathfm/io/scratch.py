"""Owner-tagged temporary names, and the sweep that removes what dead processes left behind.

A crash (``kill -9``, a power cut, an out-of-memory kill) gives a process no chance to remove its
temporary outputs and scratch stores. So every temporary name carries its owner, this host and
this process id::

    .<stem>.tmp-<host8>-<pid>-<token><suffix>       atomic output being written (io/atomic.py)
    .<stem>.old-<host8>-<pid>-<token><suffix>       an existing output moved aside while replaced
    .pathfm-<kind>-<host8>-<pid>-<random>           scratch folder (segment, translate, classify ...)

and :func:`sweep` (one ``listdir``, called when a write or a scratch store starts in a folder)
removes those whose owner is a dead process on this host. Entries of another host (a shared
network folder) or of a live process are never touched. A ``.old-`` backup of a dead owner whose
final path is missing (the crash hit between the two renames of a directory replace) is renamed
back to its final path, so the previous output is not lost. Names of the older, ownerless form
(``.<stem>.tmp-<token><suffix>``, ``pathfm-segment-<random>`` ...) are removed once they are older
than :data:`LEGACY_AGE` seconds (no live run writes for a day without touching its files).

The sweep never raises: a folder that cannot be listed or an entry that cannot be removed is
logged at debug level and left alone.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from functools import lru_cache
from pathlib import Path

__all__ = ["LEGACY_AGE", "owner_tag", "pid_alive", "scratch_dir", "sweep", "temp_name"]

log = logging.getLogger(__name__)

#: Seconds after which an ownerless temporary of the old naming is taken as abandoned.
LEGACY_AGE = 24 * 3600.0

_OWNER = r"(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-"
_OWNED_TEMP = re.compile(
    r"^\.(?P<stem>.+)\.(?P<kind>tmp|old)-" + _OWNER + r"(?P<token>[0-9a-f]{8})(?P<rest>.*)$", re.DOTALL
)
_OWNED_SCRATCH = re.compile(r"^\.pathfm-(?P<kind>[a-z]+)-" + _OWNER, re.DOTALL)
_LEGACY_TEMP = re.compile(r"^\.(?P<stem>.+)\.(?P<kind>tmp|old)-(?P<token>[0-9a-f]{8})(?P<rest>.*)$", re.DOTALL)
_LEGACY_SCRATCH = re.compile(r"^\.?pathfm-(segment|translate|features|classify)-[a-z0-9_]{8}$")


@lru_cache(maxsize=1)
def host_id() -> str:
    """First 8 hex digits of sha1(host name): which machine owns a temporary."""
    return hashlib.sha1(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def owner_tag() -> str:
    """``<host8>-<pid>`` of the calling process (computed per call: a forked child gets its own pid)."""
    return f"{host_id()}-{os.getpid()}"


def temp_name(stem: str, suffix: str, kind: str = "tmp") -> str:
    """Hidden owner-tagged name beside a final ``<stem><suffix>``; the suffix stays last (tifffile reads it).

    >>> temp_name("mask", ".ome.tif").endswith(".ome.tif")
    True
    """
    return f".{stem}.{kind}-{owner_tag()}-{uuid.uuid4().hex[:8]}{suffix}"


def pid_alive(pid: int) -> bool:
    """True when process ``pid`` exists on this host and is not a zombie (not yet reaped but dead)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    except OSError:
        return True  # cannot tell: keep its files
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] == ["Z"]


def scratch_dir(kind: str, dir: str | os.PathLike | None = None) -> tempfile.TemporaryDirectory:
    """A :class:`tempfile.TemporaryDirectory` named ``.pathfm-<kind>-<owner>-…`` in ``dir`` (default: the system's).

    Stale scratch folders of dead processes in that folder are swept first, so a run that was killed
    leaves nothing behind after the next run of any command that makes scratch stores there.
    """
    parent = Path(dir) if dir is not None else Path(tempfile.gettempdir())
    sweep(parent)
    return tempfile.TemporaryDirectory(prefix=f".pathfm-{kind}-{owner_tag()}-", dir=str(parent))


def _owner_is_dead(host: str, pid: str) -> bool:
    return host == host_id() and not pid_alive(int(pid))


def _older_than(path: Path, age: float) -> bool:
    try:
        return time.time() - path.lstat().st_mtime > age
    except OSError:
        return False


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _dispose(folder: Path, name: str, match: re.Match) -> str:
    """Remove a stale entry, or put a stale ``.old-`` backup back when its final path is missing."""
    path = folder / name
    if match.groupdict().get("kind") == "old":
        final = folder / (match["stem"] + match["rest"])
        if not final.exists() and not final.is_symlink():
            os.replace(path, final)
            log.warning("restored %s from the backup a killed run left (%s)", final, name)
            return "restored"
    _remove(path)
    return "removed"


def _stale(folder: Path, name: str, legacy_age: float) -> re.Match | None:
    """The name's match when the entry belongs to a dead process here (or is an old ownerless one)."""
    for pattern in (_OWNED_TEMP, _OWNED_SCRATCH):
        m = pattern.match(name)
        if m:
            return m if _owner_is_dead(m["host"], m["pid"]) else None
    for pattern in (_LEGACY_TEMP, _LEGACY_SCRATCH):
        m = pattern.match(name)
        if m:
            return m if _older_than(folder / name, legacy_age) else None
    return None


def sweep(folder: str | os.PathLike, *, legacy_age: float = LEGACY_AGE) -> list[Path]:
    """Remove temporaries and scratch folders in ``folder`` left by dead processes of this host.

    Parameters
    ----------
    folder
        The folder to look into (not recursive: one ``listdir``).
    legacy_age
        Ownerless temporaries of the older naming are removed when older than this (seconds).

    Returns
    -------
    list of Path
        The entries removed or restored. Never raises.
    """
    folder = Path(folder)
    try:
        names = [n for n in os.listdir(folder) if n.startswith((".", "pathfm-"))]
    except OSError:
        return []
    done: list[Path] = []
    for name in names:
        try:
            m = _stale(folder, name, legacy_age)
            if m is not None:
                _dispose(folder, name, m)
                done.append(folder / name)
        except OSError as exc:
            log.debug("could not sweep %s: %s", folder / name, exc)
    if done:
        log.info("removed %d temporary file(s) left by killed runs in %s", len(done), folder)
    return done
