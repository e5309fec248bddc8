"""Small real translation checkpoints for the translate tests: a tiny LUPI net trained a few steps on ISL.

Used by ``test_translate_pipeline.py`` (not a test module; the widget tests use the bundled models).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from napari_pathfm.io.normalize import normalize_minmax

#: A tiny LUPI net: 13 ISL planes in, DAPI + nuclei mask out (~15k parameters).
TINY = {
    "in_channels": 13,
    "init_filters": 8,
    "down_blocks": (1, 1, 1, 1),
    "up_blocks": (1, 1, 1, 1),
    "bottleneck_layers": 1,
    "growth_rate": 4,
    "dropout": 0.0,
}


def one_thread():
    """Fixture body: one torch thread for the tiny models, restored afterwards.

    On the shared 2-core machine OpenMP spin-waiting of two threads made these tests 5x slower.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def isl_card(planes: np.ndarray, dapi: np.ndarray, **extra) -> dict:
    """A translate model card with min/max statistics of the ISL training rows (top 768)."""
    data = planes[:, :768:4, ::4].astype(np.float64)
    top = dapi[:768]
    card = {
        "family": "translate",
        "channels": ["DAPI"],
        "channel_roles": ["nuclei"],
        "input_planes": 13,
        "normalization": {
            "kind": "minmax",
            "input_min": data.min(axis=(1, 2)).tolist(),
            "input_max": data.max(axis=(1, 2)).tolist(),
            "target_min": [float(top.min())],
            "target_max": [float(top.max())],
            "target_dtype": "uint16",
        },
        "tile_size": 64,
        "has_mask": True,
        "input_dtype": "uint16",
    }
    card.update(extra)
    return card


def train_tiny_lupi(planes: np.ndarray, dapi: np.ndarray, card: dict, path: Path, steps: int = 12) -> Path:
    """Train the tiny LUPI net ``steps`` Adam steps on 64 px crops of the ISL training rows; save it with ``card``.

    Image loss L1 to the normalised DAPI, mask loss BCE to its Otsu mask (the privileged
    information of HASTE's nuclei model). Enough to make the outputs and the confidence map
    follow the nuclei, not to be a good model.
    """
    import torch
    from skimage.filters import threshold_otsu

    from napari_pathfm.models import create_model, save_checkpoint

    torch.manual_seed(0)
    rng = np.random.default_rng(42)
    n = card["normalization"]
    x_all = normalize_minmax(planes[:, :768, :512], n["input_min"], n["input_max"])
    target = dapi[:768, :512].astype(np.float32)
    y_all = normalize_minmax(target, n["target_min"][0], n["target_max"][0])
    m_all = (target > threshold_otsu(target)).astype(np.float32)
    model = create_model("lupi_unet", **TINY)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        ys, xs = rng.integers(0, 768 - 64, 4), rng.integers(0, 512 - 64, 4)

        def crops(a: np.ndarray, ys=ys, xs=xs) -> torch.Tensor:
            return torch.from_numpy(np.stack([a[..., y : y + 64, x : x + 64] for y, x in zip(ys, xs)]))

        out = model(crops(x_all))
        loss = (out.image - crops(y_all[None])).abs().mean()
        loss = loss + torch.nn.functional.binary_cross_entropy_with_logits(out.mask_logits, crops(m_all[None]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return save_checkpoint(model, path, card)
