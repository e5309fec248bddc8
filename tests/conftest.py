"""Shared fixtures: the real data in ``../shared/data`` (never copied into the repo)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PATHFM_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session", autouse=True)
def _embedding_cache_in_tmp(tmp_path_factory):
    """The tile-embedding cache of every test (and the ``pathfm`` subprocesses they start) lives in a
    temporary folder, never in ``~/.napari-pathfm/cache``."""
    old = os.environ.get("PATHFM_CACHE_DIR")
    os.environ["PATHFM_CACHE_DIR"] = str(tmp_path_factory.mktemp("embedding-cache"))
    yield
    if old is None:
        os.environ.pop("PATHFM_CACHE_DIR", None)
    else:
        os.environ["PATHFM_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of the shared real data; skips the test with a reason when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared real data not found at {SHARED_DATA} (set PATHFM_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def wsi_dir(shared_data: Path) -> Path:
    return shared_data / "wsi"


@pytest.fixture(scope="session")
def cmu_small(wsi_dir: Path) -> Path:
    return wsi_dir / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a test module, restored afterwards.

    Small CPU models on the shared 2-core machine run ~3x faster with one thread than
    with two (no OpenMP spin-waiting). Use with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
    """
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
