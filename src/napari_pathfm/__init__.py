"""napari-pathfm: computational pathology foundation models in napari.

Importing this package is cheap: it imports neither torch nor napari. Heavy
modules load on first use (see ``docs/architecture.md``, contract 6).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
