"""HistoKT weight distillation: merge N checkpoints of one architecture into one, without training.

For every weight matrix the models' filters are pooled and reduced to their shared principal directions:

- Conv weights ``(n_out, n_in, kh, kw)`` are unfolded to ``W_i`` of shape ``(n_out, k)``, ``k = n_in*kh*kw``;
  linear weights ``(n_out, n_in)`` are used as they are.
- The N matrices are stacked vertically: ``M = [W_1; ...; W_N]``, shape ``(N*n_out, k)``, and decomposed,
  ``M = U S V^T`` (float64; computed from the eigenvectors of the smaller Gram matrix ``M M^T`` or ``M^T M``,
  which give the same subspaces as the SVD at a fraction of the cost).
- The top ``r = n_out`` components are kept (all of them when ``M`` has fewer), ``M_r = U_r S_r V_r^T``.
  ``M_r``'s row block ``i`` equals ``W_i V_r V_r^T``: model i's filters projected onto the shared top-``n_out``
  subspace of all models' filters. The distilled weight is the mean of the blocks,

  ``W* = (1/N) * sum_i W_i V_r V_r^T``

  folded back to the layer's shape. Because rank(M) <= n_out when the models agree, distilling a model with
  itself (or with identical copies) reconstructs every block exactly and returns the same weights (up to float
  rounding); no sign or rotation ambiguity of the SVD enters, since only the projector ``V_r V_r^T`` is used.
  With different models the component outside the shared top-``n_out`` subspace (filter directions the
  models disagree on) is removed before averaging.
- 1-D parameters and buffers (BatchNorm weight, bias, running mean and variance, linear biases) and any other
  floating tensors are averaged; integer buffers (``num_batches_tracked``) are kept from the first checkpoint.

The decompositions run on one CPU thread: the matrices are small (at most ``N*n_out`` square) and threaded
LAPACK was 4x slower on a busy 2-core machine (resnet18, 3 models: 15 s on one thread vs 61 s on two).

All checkpoints must have the same registry name, config and tensor names/shapes. Checkpoints that differ
only in the classifier (another number of classes) are refused unless ``drop_head=True``: then the tensors
whose shapes differ are not distilled but taken from the first checkpoint, whose classes the card keeps
(fine-tune the head on the target afterwards). Averaging only makes sense for models that share an
ancestry (transferred from the same source or fine-tuned from one start), as in HistoKT; independently
initialised networks have permuted filters and do not merge meaningfully.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ...errors import CheckpointError

__all__ = ["distill_checkpoints", "distill_matrix", "distill_state_dicts"]


def distill_matrix(mats: Sequence, rank: int | None = None):
    """Distil N matrices of shape ``(n_out, k)`` into one: mean of the rank-``n_out`` reconstruction's blocks.

    Parameters
    ----------
    mats : sequence of torch.Tensor
        ``(n_out, k)`` matrices of the same shape.
    rank : int, optional
        Components to keep (default ``n_out``).

    Returns
    -------
    torch.Tensor
        ``(n_out, k)`` in the dtype of the inputs.
    """
    import torch

    n_out = mats[0].shape[0]
    stacked = torch.cat([m.detach().to(torch.float64) for m in mats], dim=0)
    r = min(rank or n_out, *stacked.shape)
    if r >= min(stacked.shape):  # nothing to drop: the projector is the identity on the row space
        out = stacked.reshape(len(mats), n_out, -1).mean(0)
    elif stacked.shape[0] <= stacked.shape[1]:
        # M V_r V_r^T = U_r U_r^T M; U from the eigenvectors of the smaller Gram matrix M M^T (= U S^2 U^T),
        # which is far cheaper than a full SVD of a wide matrix.
        _, u = torch.linalg.eigh(stacked @ stacked.T)  # ascending eigenvalues
        u = u[:, -r:]
        out = (u @ (u.T @ stacked)).reshape(len(mats), n_out, -1).mean(0)
    else:
        _, v = torch.linalg.eigh(stacked.T @ stacked)  # M^T M = V S^2 V^T
        v = v[:, -r:]
        out = ((stacked @ v) @ v.T).reshape(len(mats), n_out, -1).mean(0)
    return out.to(mats[0].dtype)


def distill_state_dicts(states: Sequence[dict], skip: Sequence[str] = ()) -> dict:
    """Distil state dicts with equal keys and shapes (see the module docstring for the rules).

    ``skip`` names tensors copied from the first state dict instead (e.g. a classifier head of another size).
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see the module docstring: threaded LAPACK is slower on these small matrices
    try:
        return _distill(states, skip)
    finally:
        torch.set_num_threads(threads)


def _distill(states: Sequence[dict], skip: Sequence[str]) -> dict:
    import torch

    out = {}
    for key, first in states[0].items():
        tensors = [s[key] for s in states]
        if key in skip or not torch.is_floating_point(first) or len(states) == 1:
            out[key] = first.clone()
        elif first.ndim in (2, 4):
            mats = [t.reshape(t.shape[0], -1) for t in tensors]
            out[key] = distill_matrix(mats).reshape(first.shape).contiguous()
        else:
            out[key] = torch.stack([t.to(torch.float64) for t in tensors]).mean(0).to(first.dtype)
    return out


def _check_same_architecture(paths: list[Path], cards: list[dict], states: list[dict], drop_head: bool) -> list[str]:
    """Tensor names to copy from the first checkpoint (differing head); raise on any other difference."""
    ref_card, ref_state = cards[0], states[0]
    skip: set[str] = set()
    for path, card, state in zip(paths[1:], cards[1:], states[1:]):
        if card["name"] != ref_card["name"]:
            raise CheckpointError(
                path,
                f"is a {card['name']!r} model but {paths[0].name} is {ref_card['name']!r}; only checkpoints of one "
                "architecture can be distilled.",
                "Pass checkpoints of the same model and config.",
            )
        cfg_a = {k: v for k, v in ref_card.get("config", {}).items() if k != "num_classes"}
        cfg_b = {k: v for k, v in card.get("config", {}).items() if k != "num_classes"}
        diff = sorted(k for k in set(cfg_a) | set(cfg_b) if cfg_a.get(k) != cfg_b.get(k))
        if diff:
            detail = ", ".join(f"{k}: {cfg_b.get(k)!r} vs {cfg_a.get(k)!r}" for k in diff)
            raise CheckpointError(
                path,
                f"has a different architecture than {paths[0].name} ({detail}).",
                "Distil only checkpoints of the same model and config.",
            )
        if set(state) != set(ref_state):
            odd = sorted(set(state) ^ set(ref_state))[:5]
            raise CheckpointError(
                path, f"has other tensors than {paths[0].name} (e.g. {odd}).", "Distil only identical architectures."
            )
        shapes = sorted(k for k in state if tuple(state[k].shape) != tuple(ref_state[k].shape))
        if shapes and not drop_head:
            raise CheckpointError(
                path,
                f"has tensors of other shapes than {paths[0].name} ({', '.join(shapes[:4])}; e.g. another number of "
                "classes).",
                "Pass --drop-head to distil the encoder and keep the first checkpoint's classifier.",
            )
        skip.update(shapes)
    return sorted(skip)


def distill_checkpoints(
    checkpoints: Sequence[str | Path], out: str | Path, *, drop_head: bool = False, progress=None
) -> Path:
    """Distil pathfm checkpoints of one architecture and save the result as a checkpoint.

    Parameters
    ----------
    checkpoints : sequence of path
        Two or more ``.safetensors`` checkpoints with model cards (one is allowed: it is copied unchanged).
    out : str or Path
        Output checkpoint (``X`` or ``X.safetensors``; the card goes to ``X.json``).
    drop_head : bool
        Allow classifiers of different sizes: those tensors come from the first checkpoint.
    progress : callable, optional
        ``progress(done, total, message)`` per checkpoint loaded and at the end.

    Returns
    -------
    Path
        The written ``.safetensors`` file.

    Raises
    ------
    CheckpointError
        No checkpoints, unreadable ones, or architectures that differ (the odd file is named).
    """
    from ...models.checkpoint import load_checkpoint, save_checkpoint
    from ...progress import report

    paths = [Path(p) for p in checkpoints]
    if not paths:
        raise CheckpointError("distill", "no checkpoints given.", "Pass two or more checkpoints.")
    models, cards = [], []
    for i, p in enumerate(paths):
        model, card = load_checkpoint(p)
        models.append(model)
        cards.append(card)
        report(progress, i + 1, len(paths) + 1, f"loaded {p.name}")
    states = [m.state_dict() for m in models]
    skip = _check_same_architecture(paths, cards, states, drop_head)
    merged = distill_state_dicts(states, skip)
    target = models[0]
    target.load_state_dict(merged, strict=True)
    card = {k: v for k, v in cards[0].items() if k in ("classes", "normalization", "input_mpp", "tile_size")}
    card.update(
        {
            "name": cards[0]["name"],
            "config": cards[0]["config"],
            "description": f"HistoKT weight distillation of {len(paths)} checkpoints (SVD of stacked filters).",
            "training_data": "distilled from: " + "; ".join(str(c.get("training_data")) for c in cards),
            "distilled_from": [
                {"path": str(p.resolve()), "sha256": c.get("sha256"), "classes": c.get("classes")}
                for p, c in zip(paths, cards)
            ],
            "distillation": {
                "method": "W* = mean_i W_i V_r V_r^T, V_r = top n_out right-singular vectors of the stacked "
                "unfolded weights; 1-D tensors averaged; integer buffers from the first checkpoint",
                "head_from_first": skip,
            },
            "metrics": {},
        }
    )
    written = save_checkpoint(target, out, card)
    report(progress, len(paths) + 1, len(paths) + 1, f"wrote {written}")
    return written
