"""Stochastic gradient descent with momentum and weight decay, as each part steps it.

[Note: own SGD] These are the very tensor operations, in the same order, of torch.optim.SGD's
per-tensor path (the one torch takes for CPU tensors), so a step gives the same bits. We do not
construct torch.optim.SGD because its first construction imports torch's compiler stack (about
800 modules, ~0.6 s of CPU): a cost every peer paid at start-up for an optimizer of three lines.
On an accelerator torch would batch the same arithmetic over tensors; the results agree to
floating-point tolerance, which is all a run on an accelerator promises.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn


class Sgd:
    """SGD over `params` (dampening 0, no Nesterov). `state[param]["momentum_buffer"]` holds a
    parameter's momentum once it has had a gradient, as in torch.optim.SGD."""

    def __init__(self, params: Iterable[nn.Parameter], lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
        self.params = list(params)
        if not self.params:
            raise ValueError("SGD needs at least one parameter")
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)
        self.state: dict[Tensor, dict[str, Tensor]] = {}

    @torch.no_grad()
    def step(self) -> None:
        """One update of every parameter that has a gradient."""
        for param in self.params:
            if param.grad is None:
                continue
            grad = param.grad
            if self.weight_decay != 0:
                grad = grad.add(param, alpha=self.weight_decay)
            if self.momentum != 0:
                state = self.state.setdefault(param, {})
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = grad.detach().clone()
                else:
                    buf.mul_(self.momentum).add_(grad, alpha=1.0)
                grad = buf
            param.add_(grad, alpha=-self.lr)

    def zero_grad(self) -> None:
        """Free the gradients (torch's `set_to_none=True`)."""
        for param in self.params:
            param.grad = None
