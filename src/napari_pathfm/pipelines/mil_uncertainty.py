"""How sure a MIL model is of one slide: the bootstrap over the slide's patches.

A slide prediction is one number per class, but a pathologist reviewing a batch wants to look first at
the slides the model is least sure of. :func:`bootstrap_probabilities` predicts the slide again on
``n`` bags resampled from its own patches (with replacement, kept in their raster order, so an
order-aware model such as S4 MIL sees a plausible slide), and :func:`summarize` reduces those
predictions to a 95% interval of each class probability and the share of resamples whose predicted
class differs from the whole slide's (``flip_rate``). A slide whose decision rests on a handful of
patches flips often; one with evidence all over the tissue does not. This is the patch bootstrap of
the MIL uncertainty literature (a cheap stand-in for an ensemble of models): it measures how much
the prediction depends on which patches were seen, not how well the model is calibrated.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..progress import check_cancel

__all__ = ["bootstrap_probabilities", "summarize"]


def bootstrap_probabilities(model: Any, features: Any, n: int, *, seed: int = 0, cancel: Any = None) -> np.ndarray:
    """Class probabilities ``(n, C)`` of ``n`` bootstrap bags of ``features`` ``(1, N, D)`` (a torch tensor).

    Each bag draws N patches with replacement (seeded: the same slide gives the same interval) and
    keeps them in the order of their patch index.
    """
    import torch

    count = int(features.shape[1])
    rng = np.random.default_rng(seed)
    out = []
    with torch.inference_mode():
        for _ in range(int(n)):
            check_cancel(cancel, "MIL bootstrap")
            idx = torch.from_numpy(np.sort(rng.integers(0, count, count))).to(features.device)
            logits = model(features[:, idx])["logits"].float()
            out.append(torch.softmax(logits, dim=-1)[0].cpu().numpy())
    return np.stack(out) if out else np.zeros((0, 0), np.float32)


def summarize(probabilities: np.ndarray, boot: np.ndarray, classes: list[str]) -> dict:
    """``{"n", "interval": {class: [lo, hi]}, "flip_rate"}`` of bootstrap probabilities ``boot``.

    >>> s = summarize(np.array([0.8, 0.2]), np.array([[0.9, 0.1], [0.7, 0.3], [0.4, 0.6]]), ["a", "b"])
    >>> s["n"], round(s["flip_rate"], 3), [round(v, 2) for v in s["interval"]["a"]]
    (3, 0.333, [0.42, 0.89])
    """
    if boot.size == 0:
        return {"n": 0, "interval": {}, "flip_rate": None}
    lo, hi = np.percentile(boot, [2.5, 97.5], axis=0)
    predicted = int(np.argmax(probabilities))
    return {
        "n": int(len(boot)),
        "interval": {c: [float(lo[i]), float(hi[i])] for i, c in enumerate(classes)},
        "flip_rate": float(np.mean(np.argmax(boot, axis=1) != predicted)),
    }
