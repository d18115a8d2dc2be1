"""On a CUDA device: parts train there through the same API, states stay host tensors, memory is
read from the allocator, and a deployment with a GPU compute node trains as an all-CPU one.

Every test here skips on a machine without CUDA; `tools/gpu_check.sh` runs them where a GPU is."""

from __future__ import annotations

import pytest
import torch

from p2psl.learning import accelerator
from p2psl.learning.models import CopySet, OptimConfig, model_spec
from p2psl.runtime.metrics import read_metrics
from tests.integration.harness import log_tail, rounds_of, start_peer, wait_all, write_topology

pytestmark = [pytest.mark.timeout(600), pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: run tools/gpu_check.sh where a GPU is lent")]

CUDA = torch.device("cuda", 0) if torch.cuda.is_available() else None


def _train(device, steps: int = 4) -> CopySet:
    spec = model_spec("cnn", (1, 8, 8), 10)
    copies = CopySet(spec, [1, 2, 3], ["a", "b"], seed=0, optim=OptimConfig(), device=device)
    generator = torch.Generator().manual_seed(1)
    shape = spec.output_shapes()[0]
    for step in range(steps):
        for owner in ("a", "b"):
            part = copies.copy(owner)
            out = part.forward_train(step, torch.randn(4, *shape, generator=generator))
            assert out.device.type == "cpu"
            grad = part.backward(step, torch.randn(out.shape, generator=generator))
            assert grad.device.type == "cpu"
            part.step()
    copies.average({"a": 1.0, "b": 1.0})
    return copies


def test_resolving_cuda_and_auto():
    assert accelerator.resolve_device("c1", "cuda") == CUDA
    assert accelerator.resolve_device("c1", "auto") == CUDA
    count = torch.cuda.device_count()
    with pytest.raises(Exception, match=f"cuda:{count}' asked, but this machine has {count}"):
        accelerator.resolve_device("c1", f"cuda:{count}")


def test_parts_live_on_the_gpu_and_their_states_on_the_host():
    copies = _train(CUDA)
    part = copies.copy("a")
    assert all(p.device.type == "cuda" for p in part.module.parameters())
    assert all(v.device.type == "cpu" for v in part.state().values())
    momentum = part.optimizer_state()
    assert momentum and all(v.device.type == "cpu" for v in momentum.values())
    part.load_optimizer_state(momentum)
    assert all(b["momentum_buffer"].device.type == "cuda" for b in part._optimizer.state.values())
    assert accelerator.peak_bytes(CUDA) > 0


def test_gpu_training_stays_close_to_cpu_training():
    """Not bitwise (see [Note: determinism on accelerators]); within float32 rounding."""
    gpu, cpu = _train(CUDA).copy("a").state(), _train(torch.device("cpu")).copy("a").state()
    for key in cpu:
        assert torch.allclose(gpu[key].float(), cpu[key].float(), rtol=1e-3, atol=1e-4), key


def test_profiles_measured_on_the_gpu():
    from p2psl.planning.profile import cache_key, measure_profile

    spec = model_spec("cnn", (1, 8, 8), 10)
    profile = measure_profile(spec.build(range(spec.num_layers), 0), spec.input_shape, 16, warmup=1, repeats=3,
                              device=CUDA)
    assert profile.num_layers == spec.num_layers and all(t > 0 for t in profile.fwd)
    assert cache_key("cnn", (1, 8, 8), 16, CUDA) != cache_key("cnn", (1, 8, 8), 16)


def _deploy(tmp_path, peer_keys):
    tmp_path.mkdir()
    owners, compute = ["alice", "bob"], ["c1", "c2"]
    topology = write_topology(tmp_path, owners, compute, training={"rounds": 4, "batch_size": 16},
                              peer_keys=peer_keys)
    out = tmp_path / "out"
    procs = {name: start_peer(topology, name, out) for name in compute + owners}
    codes = wait_all(procs, timeout=500)
    assert codes == {n: 0 for n in procs}, "\n\n".join(f"{n}:\n{log_tail(out, n)}" for n in procs)
    return rounds_of(out, "alice"), out


def test_a_deployment_with_a_gpu_compute_node_trains_as_an_all_cpu_one(tmp_path):
    cpu, _ = _deploy(tmp_path / "cpu", None)
    gpu, out = _deploy(tmp_path / "gpu", {"c1": {"accelerator": "cuda", "accelerator_memory": "8GiB"}})
    assert [r["round"] for r in gpu] == [1, 2, 3, 4]
    assert gpu[-1]["test_accuracy"] >= cpu[-1]["test_accuracy"] - 0.03, (gpu[-1], cpu[-1])
    peer = [r for r in read_metrics(out / "c1" / "metrics.jsonl") if r.get("event") == "peer"][-1]
    assert peer["accelerator"] == "cuda:0" and peer["accelerator_peak_bytes"] > 0
