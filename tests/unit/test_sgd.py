"""[Note: own SGD]: the parts' optimizer gives torch.optim.SGD's bits, step after step, and does
not load torch's compiler stack."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from p2psl.learning.sgd import Sgd


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 10), torch.nn.Linear(10, 3))


@pytest.mark.parametrize("momentum, weight_decay", [(0.9, 1e-4), (0.9, 0.0), (0.0, 1e-4), (0.0, 0.0)])
def test_steps_equal_torch_sgd_to_the_bit(momentum, weight_decay):
    ours, theirs = _model(1), _model(1)
    mine = Sgd(ours.parameters(), lr=0.05, momentum=momentum, weight_decay=weight_decay)
    reference = torch.optim.SGD(theirs.parameters(), lr=0.05, momentum=momentum, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(2)
    for step in range(5):
        x, y = torch.randn(8, 1, 8, 8, generator=generator), torch.randint(0, 3, (8,), generator=generator)
        for model, optimizer in ((ours, mine), (theirs, reference)):
            torch.nn.functional.cross_entropy(model(x), y).backward()
            if step == 2:  # a parameter without a gradient is left alone, its momentum too
                model[5].bias.grad = None
            optimizer.step()
            optimizer.zero_grad()
        for a, b in zip(ours.parameters(), theirs.parameters()):
            assert torch.equal(a, b)
        for a, b in zip(ours.parameters(), theirs.parameters()):
            mine_buffer = mine.state.get(a, {}).get("momentum_buffer")
            their_buffer = reference.state.get(b, {}).get("momentum_buffer")
            assert (mine_buffer is None) == (their_buffer is None)
            assert mine_buffer is None or torch.equal(mine_buffer, their_buffer)
    assert all(p.grad is None for p in ours.parameters())


def test_an_empty_parameter_list_is_refused():
    with pytest.raises(ValueError):
        Sgd([], lr=0.1)


def test_a_step_loads_no_compiler_stack():
    probe = ("import sys, torch; from p2psl.learning.sgd import Sgd; m = torch.nn.Linear(3, 2); "
             "s = Sgd(m.parameters(), lr=0.1, momentum=0.9); m(torch.ones(1, 3)).sum().backward(); s.step(); "
             "print('torch._dynamo' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip() == "False"
