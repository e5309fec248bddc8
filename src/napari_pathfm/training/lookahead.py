"""Lookahead optimizer wrapper (Zhang, Lucas, Hinton & Ba, NeurIPS 2019).

The S4 MIL paper trains with Adam + Lookahead. Lookahead keeps a copy of the
weights ("slow weights" φ). The wrapped optimizer takes ``k`` ordinary ("fast")
steps from φ; then φ moves a fraction ``alpha`` towards where the fast weights
ended, and the fast weights restart from the new φ::

    φ ← φ + α (θ - φ);  θ ← φ        every k fast steps

timm ships a Lookahead too, but it creates φ at the first synchronisation from the
weights after ``k`` fast steps, so its first outer step is a no-op; here φ starts
from the weights before the first step, as in Algorithm 1 of the paper.
:meth:`Lookahead.state_dict` holds the wrapped optimizer's state plus φ and the
step counter, so Lightning checkpoints resume exactly.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

__all__ = ["Lookahead"]


class Lookahead(torch.optim.Optimizer):
    """Wrap ``optimizer`` so that every ``k`` steps the weights are pulled back towards slow weights.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        The inner ("fast") optimizer, e.g. ``torch.optim.Adam``. Its
        ``param_groups`` and ``state`` are shared, so learning-rate schedulers
        built on the Lookahead object change the inner optimizer's rate.
    k : int
        Fast steps per slow update (5 in the paper).
    alpha : float
        Slow-weights step size in (0, 1] (0.5 in the paper). ``alpha=1`` is the
        plain inner optimizer.

    Examples
    --------
    >>> import torch
    >>> w = torch.nn.Parameter(torch.zeros(1))
    >>> opt = Lookahead(torch.optim.SGD([w], lr=1.0), k=2, alpha=0.5)
    >>> for _ in range(2):
    ...     w.grad = torch.ones(1)
    ...     _ = opt.step()
    >>> w.item()  # fast weights went to -2, slow weights move half way
    -1.0
    """

    def __init__(self, optimizer: torch.optim.Optimizer, k: int = 5, alpha: float = 0.5):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"Lookahead wraps a torch optimizer, not {type(optimizer).__name__}")
        if int(k) < 1:
            raise ValueError(f"Lookahead k must be >= 1, got {k}")
        if not 0.0 < float(alpha) <= 1.0:
            raise ValueError(f"Lookahead alpha must be in (0, 1], got {alpha}")
        # Deliberately not calling Optimizer.__init__: groups and state are the inner optimizer's.
        self.optimizer = optimizer
        self.k, self.alpha = int(k), float(alpha)
        self.defaults = optimizer.defaults
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state
        self.slow: dict[torch.Tensor, torch.Tensor] = {}
        self.fast_steps = 0
        for name in (
            "_optimizer_step_pre_hooks",
            "_optimizer_step_post_hooks",
            "_optimizer_state_dict_pre_hooks",
            "_optimizer_state_dict_post_hooks",
            "_optimizer_load_state_dict_pre_hooks",
            "_optimizer_load_state_dict_post_hooks",
        ):
            setattr(self, name, OrderedDict())

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def step(self, closure=None):
        """One fast step of the inner optimizer; every ``k``-th also updates the slow weights."""
        for p in self._params():
            if p not in self.slow:
                self.slow[p] = p.detach().clone()
        loss = self.optimizer.step(closure)
        self.fast_steps += 1
        if self.fast_steps % self.k == 0:
            for p, slow in self.slow.items():
                slow.add_(p.detach() - slow, alpha=self.alpha)
                p.copy_(slow)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients through the inner optimizer."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        """Add a group to the inner optimizer (its slow weights start at the next step)."""
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict:
        """Inner optimizer state plus ``lookahead``: k, alpha, step count and slow weights by index."""
        state = self.optimizer.state_dict()
        index = {p: i for i, p in enumerate(self._params())}
        state["lookahead"] = {
            "k": self.k,
            "alpha": self.alpha,
            "fast_steps": self.fast_steps,
            "slow": {index[p]: s.clone() for p, s in self.slow.items() if p in index},
        }
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore what :meth:`state_dict` wrote; slow weights follow their parameter's device and dtype."""
        state_dict = dict(state_dict)
        extra = state_dict.pop("lookahead", None) or {}
        self.optimizer.load_state_dict(state_dict)
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state
        self.k = int(extra.get("k", self.k))
        self.alpha = float(extra.get("alpha", self.alpha))
        self.fast_steps = int(extra.get("fast_steps", 0))
        params = self._params()
        self.slow = {params[int(i)]: s.detach().to(params[int(i)]).clone() for i, s in extra.get("slow", {}).items()}

    def __repr__(self) -> str:
        return f"Lookahead(k={self.k}, alpha={self.alpha}, optimizer={self.optimizer!r})"
