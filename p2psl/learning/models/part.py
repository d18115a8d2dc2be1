"""A Part: one copy of a contiguous slice of layers, with its own SGD optimizer.

A part is driven one batch at a time from outside (the data owner or a compute node's task loop):
`forward_train` keeps what backward needs under a key and returns a detached output for the wire;
`backward` consumes that stash and returns the gradient for the previous hop. No I/O here.

[Note: global state names] State dicts are keyed by the model's 0-based layer index
("5.conv1.weight"), not by the position inside the slice, so the union of all parts' states is
the full model's state and a checkpoint still means the same after a re-plan moves the cuts.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from p2psl.errors import TrainingError
from p2psl.learning.accelerator import to_device, to_host
from p2psl.learning.sgd import Sgd

if TYPE_CHECKING:
    from p2psl.topology import TrainingConfig


@dataclass(frozen=True)
class OptimConfig:
    """SGD hyper-parameters (SPEC §2: the paper uses lr 0.01, momentum 0.9, weight decay 1e-4)."""

    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0

    @classmethod
    def from_training(cls, cfg: TrainingConfig) -> OptimConfig:
        """From a `p2psl.topology.TrainingConfig`."""
        return cls(cfg.learning_rate, cfg.momentum, cfg.weight_decay)


class _Layers(nn.Module):
    """Layers run in order, registered under their global index (see [Note: global state names])."""

    def __init__(self, layers: Sequence[nn.Module], indices: Sequence[int]):
        super().__init__()
        self.order = [str(i) for i in indices]
        for name, layer in zip(self.order, layers):
            self.add_module(name, layer)

    def forward(self, x: Tensor) -> Tensor:
        for name in self.order:
            x = self._modules[name](x)
        return x


class Part:
    """One copy of layers `indices` of a model.

    `input_grad` is False for a data owner's first part, whose input is data: there is no hop
    before it to send a gradient to, so none is computed. `input_shape` (without the batch
    dimension) makes a wrong-sized input a `TrainingError` on the first batch instead of a
    cryptic error deep inside a layer.

    The weights, gradients, stashes and optimizer state live on `device`; what goes in and comes
    out (inputs, outputs, gradients, states) is in host memory, as the wire and checkpoints want.
    """

    def __init__(self, layers: Sequence[nn.Module], indices: Sequence[int], optim: OptimConfig,
                 *, input_grad: bool = True, input_shape: Sequence[int] | None = None, name: str = "part",
                 device: torch.device | None = None):
        if len(layers) != len(indices) or not layers:
            raise ValueError("a part needs one or more layers and one index per layer")
        self.indices = tuple(int(i) for i in indices)
        self.device = device or torch.device("cpu")
        self.module = _Layers(layers, self.indices).to(self.device).train()
        self.input_grad = input_grad
        self.input_shape = None if input_shape is None else tuple(input_shape)
        self.name = name
        self.optim = optim
        params = list(self.module.parameters())
        # a slice of pooling layers has nothing to optimise; SGD refuses an empty list
        self._optimizer = _sgd(params, optim) if params else None
        self._stash: dict[Hashable, tuple[Tensor, Tensor]] = {}

    def __repr__(self) -> str:
        return f"Part({self.name}, layers {self.indices[0] + 1}–{self.indices[-1] + 1})"

    # -- training ---------------------------------------------------------------------------------
    def forward_train(self, key: Hashable, x: Tensor) -> Tensor:
        """Run the slice with autograd, keep what backward needs under `key`, return a detached output."""
        self._check_input(x)
        if key in self._stash:
            raise TrainingError(f"{self.name}: a forward pass for {key!r} is already pending")
        x = to_device(x, self.device)
        if self.input_grad and x.is_floating_point():
            x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            out = self._run(x)
        self._stash[key] = (x, out)
        return to_host(out.detach())

    def backward(self, key: Hashable, grad_output: Tensor) -> Tensor | None:
        """Backpropagate `grad_output` for `key`; the gradient w.r.t. the input (None without one)."""
        x, out = self._pop(key)
        if tuple(grad_output.shape) != tuple(out.shape):
            raise TrainingError(f"{self.name}: gradient for {key!r} has shape {tuple(grad_output.shape)}, "
                                f"the output had {tuple(out.shape)}")
        if out.requires_grad:
            out.backward(to_device(grad_output, self.device).to(out.dtype))
        if not (self.input_grad and x.requires_grad):
            return None
        return to_host(x.grad if x.grad is not None else torch.zeros_like(x))

    def step(self) -> None:
        """Apply the accumulated gradients, then free them."""
        if self._optimizer is not None:
            self._optimizer.step()
            self._optimizer.zero_grad()

    def forward_eval(self, x: Tensor) -> Tensor:
        """Inference: no autograd, eval mode (dropout off, running BN statistics) for this call."""
        self._check_input(x)
        self.module.eval()
        try:
            with torch.no_grad():
                return to_host(self._run(to_device(x, self.device)))
        finally:
            self.module.train()

    def _run(self, x: Tensor) -> Tensor:
        """The layers on `x`; a failure inside them names this part (e.g. BatchNorm on one sample)."""
        try:
            return self.module(x)
        except (RuntimeError, ValueError) as exc:
            raise TrainingError(f"{self!r} failed on an input of shape {tuple(x.shape)}: {exc}") from exc

    # -- stashes ----------------------------------------------------------------------------------
    @property
    def stash_count(self) -> int:
        """Forward passes waiting for their backward (activation memory held)."""
        return len(self._stash)

    def drop(self, key: Hashable) -> None:
        """Forget the forward pass of a batch abandoned after a fault (no error if absent)."""
        self._stash.pop(key, None)

    def has_stash(self, key: Hashable) -> bool:
        """Whether a forward pass for `key` waits for its backward."""
        return key in self._stash

    def drop_all(self) -> None:
        """Forget every pending forward pass and any gradient not yet stepped: a batch cut short
        (its owner left the round between micro-batches) must not reach the next step."""
        self._stash.clear()
        if self._optimizer is not None:
            self._optimizer.zero_grad()

    def _pop(self, key: Hashable) -> tuple[Tensor, Tensor]:
        try:
            return self._stash.pop(key)
        except KeyError:
            raise TrainingError(f"{self.name}: backward for {key!r} without a pending forward pass") from None

    def _check_input(self, x: Tensor) -> None:
        if self.input_shape is not None and tuple(x.shape[1:]) != self.input_shape:
            raise TrainingError(f"{self.name}: input of shape {tuple(x.shape[1:])} (without the batch "
                                f"dimension), expected {self.input_shape}")

    # -- state ------------------------------------------------------------------------------------
    def state(self, snapshot: bool = True) -> dict[str, Tensor]:
        """Parameters and buffers (see [Note: global state names]): detached CPU clones, or with
        `snapshot=False` the live tensors themselves, for a reader that is done before this part
        changes again (no second copy of the weights)."""
        state = {k: to_host(v.detach()) for k, v in self.module.state_dict().items()}
        fresh = self.device.type != "cpu"  # the copy to the host is already a snapshot
        return {k: v.clone() for k, v in state.items()} if snapshot and not fresh else state

    def load_state(self, state: Mapping[str, Tensor]) -> None:
        """Replace parameters and buffers; keys and shapes must match this part exactly."""
        _check_same(self.name, "state", self.module.state_dict(), state)
        with torch.no_grad():
            self.module.load_state_dict({k: state[k] for k in state})

    def optimizer_state(self, snapshot: bool = True) -> dict[str, Tensor]:
        """SGD momentum buffers as "<parameter>.momentum_buffer" → tensor (none before a step);
        clones, or the live buffers with `snapshot=False` (as `state`)."""
        if self._optimizer is None:
            return {}
        out = {}
        for name, param in self.module.named_parameters():
            buffer = self._optimizer.state.get(param, {}).get("momentum_buffer")
            if buffer is not None:
                host = to_host(buffer.detach())
                out[f"{name}.momentum_buffer"] = host.clone() if snapshot and host is buffer else host
        return out

    def load_optimizer_state(self, state: Mapping[str, Tensor]) -> None:
        """Restore momentum buffers written by `optimizer_state` (an empty dict resets them)."""
        params = dict(self.module.named_parameters())
        expected = {f"{n}.momentum_buffer": p for n, p in params.items()}
        unknown = sorted(set(state) - set(expected))
        if unknown:
            raise TrainingError(f"{self.name}: optimizer state has unknown keys {unknown[:5]}")
        _check_same(self.name, "optimizer state", {k: expected[k] for k in state}, state)
        if self._optimizer is None:
            return
        self._optimizer.state.clear()
        for key, tensor in state.items():
            self._optimizer.state[expected[key]] = {"momentum_buffer": tensor.detach().to(self.device, copy=True)}

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    @property
    def parameter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.module.parameters())


def _sgd(params: list[nn.Parameter], optim: OptimConfig) -> Sgd:
    return Sgd(params, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)


def _check_same(name: str, what: str, expected: Mapping[str, Tensor], given: Mapping[str, Tensor]) -> None:
    """Raise a `TrainingError` listing missing, unexpected and wrongly shaped entries."""
    missing = sorted(set(expected) - set(given))
    extra = sorted(set(given) - set(expected))
    shapes = [f"{k}: {tuple(given[k].shape)} instead of {tuple(expected[k].shape)}"
              for k in sorted(set(expected) & set(given)) if given[k].shape != expected[k].shape]
    problems = ([f"missing {missing[:5]}"] if missing else []) + ([f"unexpected {extra[:5]}"] if extra else []) + shapes[:5]
    if problems:
        raise TrainingError(f"{name}: {what} does not fit: " + "; ".join(problems))
