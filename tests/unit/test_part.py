"""Parts: the split model must equal the unsplit one (SPEC §1, check a), and parts fail loudly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from p2psl.errors import TrainingError
from p2psl.learning.models import OptimConfig, OwnerModel, Part, model_spec

torch.set_num_threads(1)

SHAPES = {"mlp": (1, 8, 8), "cnn": (1, 8, 8), "vgg19": (3, 32, 32), "resnet101": (3, 32, 32)}
# last layer of the owner's first part, of compute node 1, of compute node 2 (1-based, as in a Plan);
# vgg19 and resnet101 use the authors' owner layers (1–3 + 23–25, 1–2 + 37)
CUTS = {"mlp": (1, 2, 3), "cnn": (1, 3, 5), "vgg19": (3, 12, 22), "resnet101": (2, 20, 36)}
OPTIM = OptimConfig(lr=0.05, momentum=0.9, weight_decay=1e-4)
SEED = 11


def _batch(name: str, size: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand((size, *SHAPES[name]), generator=generator)
    return x, torch.tensor([3, 7, 1, 0][:size])


def _unsplit(spec, x, y, cuts):
    """The whole model's forward and backward: activations at the cuts (with gradients), loss."""
    full = spec.build_all(SEED)
    acts = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)  # same dropout masks as the split run
        h = x
        for index, layer in enumerate(full, start=1):
            h = layer(h)
            if index in cuts:
                h.retain_grad()
                acts[index] = h
        loss = F.cross_entropy(h, y)
        loss.backward()
    return full, acts, loss.item()


def _split_parts(spec, cuts):
    a, b, c = cuts
    shapes = spec.output_shapes()
    owner = OwnerModel(spec, range(a), range(c, spec.num_layers), SEED, OPTIM)
    middle = [Part(spec.build(range(lo, hi), SEED), range(lo, hi), OPTIM, input_shape=shapes[lo - 1], name=f"c{i}")
              for i, (lo, hi) in enumerate([(a, b), (b, c)], start=1)]
    return owner, middle


def _split_run(owner, c1, c2, x, y):
    """One batch through owner → c1 → c2 → owner and back: the cut activations and gradients, loss."""
    key = (0, 0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        h0 = owner.forward(key, x)
        h1 = c1.forward_train(key, h0)
        h2 = c2.forward_train(key, h1)
        loss, g2 = owner.loss_backward(key, h2, y)
    g1 = c2.backward(key, g2)
    g0 = c1.backward(key, g1)
    owner.backward(key, g0)
    return (h0, h1, h2), (g0, g1, g2), loss


def _assert_params(name, parts, reference, what):
    """Every part's tensors (grads or state) equal the full model's; every reference entry is used."""
    unused = set(reference)
    for part in parts:
        for pname, tensor in what(part):
            # torch.equal first: assert_close alone takes seconds on VGG-19's 400 MB layer
            if not torch.equal(tensor, reference[pname]):
                assert_close(tensor, reference[pname], msg=lambda m: f"{name} {pname}: {m}")
            unused.discard(pname)
    assert not unused, f"not in any part: {sorted(unused)[:5]}"


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet101", "vgg19"])
def test_split_training_equals_unsplit(name):
    spec = model_spec(name, SHAPES[name], 10)
    x, y = _batch(name)
    cuts = CUTS[name]
    full, acts, ref_loss = _unsplit(spec, x, y, cuts)
    owner, (c1, c2) = _split_parts(spec, cuts)
    parts = [owner.first, c1, c2, owner.last]
    hs, gs, loss = _split_run(owner, c1, c2, x, y)

    for cut, h, g in zip(cuts, hs, gs):
        assert not h.requires_grad  # what goes on the wire is detached
        assert_close(h, acts[cut].detach())
        assert_close(g, acts[cut].grad)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert all(p.stash_count == 0 for p in parts)
    grads = {n: p.grad for n, p in full.named_parameters()}
    _assert_params(name, parts, grads, lambda part: ((n, p.grad) for n, p in part.module.named_parameters()))
    del grads, acts

    full.eval()  # inference through the parts equals the whole model's (dropout off, running stats)
    with torch.no_grad():
        expected = full(x)
    full.train()
    assert_close(owner.predict(c2.forward_eval(c1.forward_eval(owner.embed(x)))), expected)

    torch.optim.SGD(full.parameters(), lr=OPTIM.lr, momentum=OPTIM.momentum, weight_decay=OPTIM.weight_decay).step()
    for part in parts:
        part.step()
        assert all(p.grad is None for p in part.module.parameters())
    _assert_params(name, parts, full.state_dict(), lambda part: part.module.state_dict().items())


def _mlp_parts():
    spec = model_spec("mlp", SHAPES["mlp"], 10)
    shapes = spec.output_shapes()
    owner = OwnerModel(spec, [0], [3], SEED, OPTIM, name="alice")
    middle = Part(spec.build([1, 2], SEED), [1, 2], OPTIM, input_shape=shapes[0], name="c1")
    return spec, owner, middle


def test_wrong_input_shape_is_a_training_error_naming_part_and_shapes():
    _, owner, middle = _mlp_parts()
    with pytest.raises(TrainingError, match=r"c1: input of shape \(64,\).*expected \(128,\)"):
        middle.forward_train("k", torch.zeros(2, 64))
    with pytest.raises(TrainingError, match="alice first part"):
        owner.forward("k", torch.zeros(2, 3, 8, 8))


def test_backward_misuse_is_a_training_error():
    _, _, middle = _mlp_parts()
    with pytest.raises(TrainingError, match="without a pending forward"):
        middle.backward("k", torch.zeros(2, 64))
    middle.forward_train("k", torch.zeros(2, 128))
    with pytest.raises(TrainingError, match="already pending"):
        middle.forward_train("k", torch.zeros(2, 128))
    with pytest.raises(TrainingError, match="gradient .* has shape"):
        middle.backward("k", torch.zeros(2, 10))


def test_stashes_are_released_by_backward_and_drop():
    _, owner, middle = _mlp_parts()
    x, y = _batch("mlp")
    h = owner.forward("a", x)
    middle.forward_train("a", h)
    middle.forward_train("b", h)
    assert middle.stash_count == 2
    assert middle.backward("b", torch.ones(2, 64)).shape == (2, 128)
    middle.drop("a")
    middle.drop("never")  # harmless
    assert middle.stash_count == 0
    assert owner.first.backward("a", torch.ones(2, 128)) is None  # its input is data
    assert owner.first.stash_count == 0


def test_dropping_all_forgets_a_batch_cut_short_between_micro_batches():
    """[Note: micro-batches]: gradients of a batch whose last micro-batch never came (its owner
    was cut out of the round) must not be stepped with the next batch."""
    _, owner, middle = _mlp_parts()
    x, _ = _batch("mlp")
    middle.forward_train((1, 1, 0), owner.forward((1, 1, 0), x))
    middle.forward_train((1, 1, 1), owner.forward((1, 1, 1), x))
    middle.backward((1, 1, 0), torch.ones(2, 64))  # micro-batch 1's gradient never comes
    assert any(p.grad is not None for p in middle.module.parameters())
    before = {k: v.clone() for k, v in middle.state().items()}
    middle.drop_all()
    middle.step()
    assert middle.stash_count == 0 and all(p.grad is None for p in middle.module.parameters())
    assert all(torch.equal(v, before[k]) for k, v in middle.state().items())


def test_forward_eval_leaves_train_mode_and_autograd_alone():
    spec = model_spec("vgg19", SHAPES["vgg19"], 10)
    part = Part(spec.build([23], SEED), [23], OPTIM)  # Linear + ReLU + Dropout
    x = torch.rand(2, 4096)
    out = part.forward_eval(x)
    assert not out.requires_grad
    assert torch.equal(out, part.forward_eval(x))  # dropout is off
    assert part.module.training


def test_parameterless_part_has_no_optimizer_and_still_passes_gradients():
    spec = model_spec("vgg19", SHAPES["vgg19"], 10)
    pool = Part(spec.build([2], SEED), [2], OPTIM, input_shape=(64, 32, 32))
    out = pool.forward_train("k", torch.rand(1, 64, 32, 32))
    assert out.shape == (1, 64, 17, 17)
    assert pool.backward("k", torch.ones_like(out)).shape == (1, 64, 32, 32)
    pool.step()
    assert pool.num_parameters == 0 and pool.state() == {} and pool.optimizer_state() == {}


def _train_step(owner: OwnerModel, middle: Part, key, x, y) -> float:
    loss, g = owner.loss_backward(key, middle.forward_train(key, owner.forward(key, x)), y)
    owner.backward(key, middle.backward(key, g))
    owner.step()
    middle.step()
    return loss


def test_state_and_optimizer_state_round_trip_continue_identically():
    spec, owner, middle = _mlp_parts()
    x, y = _batch("mlp", 4)
    _train_step(owner, middle, 0, x, y)
    _, owner2, middle2 = _mlp_parts()
    owner2.load_state(owner.state())
    owner2.load_optimizer_state(owner.optimizer_state())
    middle2.load_state(middle.state())
    middle2.load_optimizer_state(middle.optimizer_state())
    assert sorted(middle.optimizer_state()) == [f"{i}.0.{p}.momentum_buffer" for i in (1, 2) for p in ("bias", "weight")]
    assert _train_step(owner, middle, 1, x, y) == _train_step(owner2, middle2, 1, x, y)
    for a, b in ((owner.state(), owner2.state()), (middle.state(), middle2.state())):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_state_is_keyed_by_global_layer_index():
    _, owner, middle = _mlp_parts()
    assert sorted(middle.state()) == ["1.0.bias", "1.0.weight", "2.0.bias", "2.0.weight"]
    assert sorted(owner.state()) == ["0.1.bias", "0.1.weight", "3.bias", "3.weight"]
    state = middle.state()
    assert state["1.0.weight"].data_ptr() != middle.module.state_dict()["1.0.weight"].data_ptr()


def test_load_state_mismatches_are_training_errors():
    _, owner, middle = _mlp_parts()
    state = middle.state()
    with pytest.raises(TrainingError, match="missing"):
        middle.load_state({k: v for k, v in state.items() if k != "2.0.bias"})
    with pytest.raises(TrainingError, match=r"2.0.bias: \(3,\) instead of \(64,\)"):
        middle.load_state({**state, "2.0.bias": torch.zeros(3)})
    with pytest.raises(TrainingError, match="unexpected"):
        middle.load_state({**state, "9.weight": torch.zeros(1)})
    with pytest.raises(TrainingError, match="other layers"):
        owner.load_state({**owner.state(), **state})
    with pytest.raises(TrainingError, match="unknown keys"):
        middle.load_optimizer_state({"1.0.weight": torch.zeros(1)})
    with pytest.raises(TrainingError, match="instead of"):
        middle.load_optimizer_state({"1.0.weight.momentum_buffer": torch.zeros(1)})


def test_sizes():
    _, _, middle = _mlp_parts()
    assert middle.num_parameters == 128 * 128 + 128 + 128 * 64 + 64
    assert middle.parameter_bytes == 4 * middle.num_parameters


def test_a_failure_inside_the_layers_names_the_part():
    spec = model_spec("resnet101", SHAPES["resnet101"], 10)
    block = Part(spec.build([33], SEED), [33], OPTIM, name="c2")  # a BatchNorm block at 1×1 pixels
    with pytest.raises(TrainingError, match=r"c2, layers 34–34.*shape \(1, 512, 1, 1\)"):
        block.forward_train("k", torch.rand(1, 512, 1, 1))  # one value per channel: no batch statistics
    assert block.stash_count == 0


def test_owner_model_from_plan():
    from p2psl.planning.plan import plan_from_cuts

    spec = model_spec("cnn", SHAPES["cnn"], 10)
    plan = plan_from_cuts([1, 3, 5], ["c1", "c2"], ["alice"], spec.num_layers)
    owner = OwnerModel.from_plan(spec, plan, SEED, OPTIM)
    assert owner.first.indices == (0,) and owner.last.indices == (5,)
    assert owner.last.input_shape == (64,)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_a_local_step_is_the_split_batch_bit_for_bit(name):
    """A federated-averaging owner's whole-model step (`OwnerModel.local_step`) gives the very bits
    of the same batches run through a chain of parts, batch after batch, weights and momentum."""
    spec = model_spec(name, SHAPES[name], 10)
    a, _, c = CUTS[name]
    whole = OwnerModel(spec, range(c), range(c, spec.num_layers), SEED, OPTIM)
    owner, (c1, c2) = _split_parts(spec, CUTS[name])
    generator = torch.Generator().manual_seed(5)
    for batch in range(6):
        x = torch.rand((8, *SHAPES[name]), generator=generator)
        y = torch.randint(0, 10, (8,), generator=generator)
        local_loss = whole.local_step(batch, x, y)
        _, _, loss = _split_run(owner, c1, c2, x, y)
        owner.step(), c1.step(), c2.step()
        assert local_loss == loss
    split = {**owner.state(), **c1.state(), **c2.state()}
    for key, value in whole.state().items():
        assert torch.equal(value, split[key]), key
    split_momentum = {**owner.optimizer_state(), **c1.optimizer_state(), **c2.optimizer_state()}
    for key, value in whole.optimizer_state().items():
        assert torch.equal(value, split_momentum[key]), key


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_micro_batches_add_up_to_the_whole_batch(name):
    """[Note: micro-batches]: a batch cut into 3 micro-batches through owner → c1 → c2 → owner
    gives the whole model's outputs at every cut, the whole batch's gradients and the same step,
    to float rounding (the gradients are summed in another order)."""
    spec = model_spec(name, SHAPES[name], 10)
    generator = torch.Generator().manual_seed(3)
    x, y = torch.rand((7, *SHAPES[name]), generator=generator), torch.randint(0, 10, (7,), generator=generator)
    cuts = CUTS[name]
    full, acts, _ = _unsplit(spec, x, y, cuts)
    owner, (c1, c2) = _split_parts(spec, cuts)
    pieces = torch.tensor_split(torch.arange(7), 3)
    outs = {cut: [] for cut in cuts}
    for micro, index in enumerate(pieces):  # forward every micro-batch, as the owner sends them
        h0 = owner.forward(micro, x[index])
        h1 = c1.forward_train(micro, h0)
        h2 = c2.forward_train(micro, h1)
        for cut, h in zip(cuts, (h0, h1, h2)):
            outs[cut].append(h)
        _, g2 = owner.loss_backward(micro, h2, y[index], len(index) / 7)
        owner.backward(micro, c1.backward(micro, c2.backward(micro, g2)))
    for cut in cuts:
        assert_close(torch.cat(outs[cut]), acts[cut].detach())
    parts = [owner.first, c1, c2, owner.last]
    grads = {n: p.grad for n, p in full.named_parameters()}
    _assert_params(name, parts, grads, lambda part: ((n, p.grad) for n, p in part.module.named_parameters()))
    torch.optim.SGD(full.parameters(), lr=OPTIM.lr, momentum=OPTIM.momentum, weight_decay=OPTIM.weight_decay).step()
    for part in parts:
        part.step()
    _assert_params(name, parts, full.state_dict(), lambda part: part.module.state_dict().items())
