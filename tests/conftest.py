"""Shared fixtures: the real data in ``../shared/data`` (never copied into the repo)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PATHFM_SHARED_DATA", REPO.parent / "shared" / "data"))
# recipes' ${PATHFM_SHARED_DATA} (in tests and the `pathfm` processes they start) means this folder; the
# package itself defaults to a per-user folder, never to one beside the repository
os.environ.setdefault("PATHFM_SHARED_DATA", str(SHARED_DATA))


@pytest.fixture(scope="session", autouse=True)
def _embedding_cache_in_tmp(tmp_path_factory):
    """The tile-embedding cache and the per-user data folder (corrections, fine-tunes, runs) of every
    test and of the ``pathfm`` subprocesses they start live in temporary folders, never in the home folder."""
    names = {"PATHFM_CACHE_DIR": "embedding-cache", "PATHFM_DATA_DIR": "user-data"}
    old = {k: os.environ.get(k) for k in names}
    for k, folder in names.items():
        os.environ[k] = str(tmp_path_factory.mktemp(folder))
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


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


@pytest.fixture
def tiny_pathsam2() -> dict:
    """``create_model("pathsam2", **tiny_pathsam2)`` settings of a random-init toy Path-SAM2 (tests/toy_models.py)."""
    from toy_models import TINY_PATHSAM2

    return dict(TINY_PATHSAM2)
