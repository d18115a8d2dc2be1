"""The accelerator key resolved to a torch device, and parts that train there through one API."""

from __future__ import annotations

import pytest
import torch

from p2psl.errors import ConfigError
from p2psl.learning import accelerator
from p2psl.learning.models import CopySet, OptimConfig, model_spec

CUDA = torch.cuda.is_available()


def test_cpu_is_the_cpu_and_auto_falls_back_to_it_without_cuda(caplog):
    assert accelerator.resolve_device("c1", "cpu") == torch.device("cpu")
    with caplog.at_level("INFO", "p2psl.accelerator"):
        device = accelerator.resolve_device("c1", "auto")
    assert device == (torch.device("cuda", 0) if CUDA else torch.device("cpu"))
    assert f"c1: accelerator 'auto' chose {device}" in caplog.text


@pytest.mark.skipif(CUDA, reason="this machine has CUDA: the error is for machines without")
@pytest.mark.parametrize("asked", ["cuda", "cuda:1"])
def test_cuda_without_cuda_names_the_peer_and_the_torch_found(asked):
    with pytest.raises(ConfigError) as info:
        accelerator.resolve_device("c1", asked)
    assert str(info.value).startswith(f"c1: accelerator '{asked}' asked, but this torch ({torch.__version__})")
    assert info.value.exit_code == 2


def test_a_device_index_beyond_the_machine_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert accelerator.resolve_device("c1", "cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"c1: accelerator 'cuda:2' asked, but this machine has 2 CUDA devices"):
        accelerator.resolve_device("c1", "cuda:2")


def test_on_the_cpu_the_helpers_are_identities():
    t = torch.randn(3, 4)
    cpu = torch.device("cpu")
    assert accelerator.to_device(t, cpu) is t and accelerator.to_host(t) is t
    assert accelerator.peak_bytes(cpu) is None
    accelerator.synchronize(cpu)
    accelerator.reset_peak(cpu)


def _train(device: torch.device | None, steps: int = 3) -> CopySet:
    spec = model_spec("cnn", (1, 8, 8), 10)
    copies = CopySet(spec, [1, 2, 3], ["a", "b"], seed=0, optim=OptimConfig(), device=device)
    generator = torch.Generator().manual_seed(1)
    shape = spec.output_shapes()[0]
    for step in range(steps):
        for owner in ("a", "b"):
            part = copies.copy(owner)
            x = torch.randn(4, *shape, generator=generator)
            out = part.forward_train(step, x)
            assert out.device.type == "cpu"
            grad = part.backward(step, torch.randn(out.shape, generator=generator))
            assert grad.device.type == "cpu" and grad.shape == x.shape
            part.step()
    copies.average({"a": 1.0, "b": 1.0})
    return copies


def test_an_explicit_cpu_device_trains_to_the_same_bits_as_the_default():
    default, explicit = _train(None), _train(torch.device("cpu"))
    for owner in ("a", "b"):
        mine, theirs = explicit.copy(owner).state(), default.copy(owner).state()
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)
        assert all(v.device.type == "cpu" for v in explicit.copy(owner).optimizer_state().values())


def test_states_and_optimizer_states_load_onto_the_parts_device():
    copies = _train(torch.device("cpu"))
    part = copies.copy("a")
    momentum = part.optimizer_state()
    assert momentum
    part.load_optimizer_state(momentum)
    again = part.optimizer_state()
    assert all(torch.equal(momentum[k], again[k]) for k in momentum)


def test_profiles_are_timed_after_the_device_drained(monkeypatch):
    from p2psl.planning import measure, profile

    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    measure.synchronizer(torch.device("cuda", 0))()
    measure.synchronizer(torch.device("cpu"))()
    measure.synchronizer(None)()
    assert calls == [torch.device("cuda", 0)]
    spec = model_spec("mlp", (1, 8, 8), 10)
    measured = profile.measure_profile(spec.build(range(spec.num_layers), 0), spec.input_shape, 4,
                                       warmup=0, repeats=1, device=torch.device("cpu"))
    assert measured.num_layers == spec.num_layers and not calls[1:]
    assert profile.cache_key("mlp", (1, 8, 8), 4, torch.device("cpu")) == profile.cache_key("mlp", (1, 8, 8), 4)
