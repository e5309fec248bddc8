"""Names of the foundation models found on this machine, for the docks' backbone pickers, looked up off the GUI thread.

Listing the Hugging Face cache reads a folder and a ``config.json`` per cached model
(:func:`napari_pathfm.models.hub_cache.find_local_models`), which on a network home folder can take
longer than the GUI may wait, so :class:`FoundationNames` does it in a thread once per session and
hands the names to the GUI thread through a queued Qt signal. Models that timm cannot build
(Phikon-v2, CONCH) are left out.
"""

from __future__ import annotations

import logging
import threading

from qtpy.QtCore import QObject, Signal

__all__ = ["FoundationNames", "local_foundation_names"]

log = logging.getLogger(__name__)


def local_foundation_names() -> list[str]:
    """``hf-hub:ORG/NAME`` (or folder) of every foundation model found offline that can be built here."""
    from ..models.foundation import foundation_spec
    from ..models.hub_cache import find_local_models

    names = []
    for model in find_local_models():
        spec = foundation_spec(model.repo_id or "")
        if spec is None or spec.framework == "timm":
            names.append(model.name)
    return names


class FoundationNames(QObject):
    """Looks the names up in a thread (once); ``found`` carries them to the GUI thread.

    Examples
    --------
    >>> names = FoundationNames()                       # doctest: +SKIP
    >>> names.found.connect(lambda n: combo.addItems(n))  # doctest: +SKIP
    >>> names.request()                                 # doctest: +SKIP
    """

    found = Signal(list)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.names: list[str] | None = None
        self._thread: threading.Thread | None = None

    def request(self) -> None:
        """Emit ``found`` with the names: at once when known, else after a lookup in a thread."""
        if self.names is not None:
            self.found.emit(list(self.names))
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._look_up, name="pathfm-foundation-names", daemon=True)
            self._thread.start()

    def _look_up(self) -> None:
        try:
            names = local_foundation_names()
        except Exception:  # a picker without extra names is better than a crashed dock
            log.warning("could not list the local foundation models", exc_info=True)
            names = []
        self.names = names
        self.found.emit(list(names))  # queued to the GUI thread: the receiver lives there
