"""What a model is to p2psl: a list of indivisible layers that any peer can build a slice of.

[Note: per-layer init] Every peer builds only the layers it runs (a compute node holding VGG-19's
convolutions must never allocate its 400 MB classifier), yet all slices must agree bit for bit
with the full model. So zoo layers are created on the ``meta`` device (no memory, no random
numbers) and then initialised from a private generator seeded by (seed, layer index) alone: the
result depends on nothing else — not on which other layers are built, not on the global torch RNG,
not on other threads using it. User factories cannot be built per layer; they are called once
under a seeded global RNG and sliced.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import init

from p2psl.errors import ConfigError
from p2psl.planning.profile import cache_root, write_atomic
from p2psl.planning.profiling import Layers

#: builds one indivisible layer (called under ``torch.device("meta")``)
Blueprint = Callable[[], nn.Module]
#: builds the requested 0-based layers for a seed
Maker = Callable[[Sequence[int], int], list[nn.Module]]


@dataclass(frozen=True)
class ModelSpec:
    """A model as a sequence of `num_layers` indivisible layers, buildable slice by slice."""

    name: str
    num_layers: int
    input_shape: tuple[int, ...]
    num_classes: int
    maker: Maker = field(compare=False, repr=False)
    #: every layer, possibly on the meta device: only for sizes and shapes
    sketch: Callable[[], list[nn.Module]] = field(compare=False, repr=False)
    #: names the layers' sizes and shapes in the cache ([Note: layer facts cache]); None: not cached
    facts_key: str | None = field(default=None, compare=False, repr=False)

    def build(self, indices: Sequence[int], seed: int) -> list[nn.Module]:
        """The layers at `indices` (0-based), in that order, in train mode, on the CPU."""
        indices = [int(i) for i in indices]
        bad = [i for i in indices if not 0 <= i < self.num_layers]
        if bad:
            raise IndexError(f"{self.name} has layers 0..{self.num_layers - 1}, asked for {bad}")
        return self.maker(indices, seed)

    def build_all(self, seed: int) -> nn.Sequential:
        """The whole model as one `nn.Sequential` (centralized training, tests)."""
        return nn.Sequential(*self.build(range(self.num_layers), seed))

    def output_shapes(self) -> list[tuple[int, ...]]:
        """Each layer's output shape without the batch dimension (cut sizes for the planner)."""
        return [shape for shape, _ in _layer_facts(self)]

    def parameter_bytes(self) -> list[int]:
        """Bytes of parameters and buffers of each layer (what a copy of it weighs)."""
        return [size for _, size in _layer_facts(self)]

    def measurable(self, seed: int) -> Layers:
        """What profiling needs: the layers' shapes and sizes, and each layer built alone."""
        return Layers(self.name, self.input_shape, self.output_shapes(), self.parameter_bytes(),
                      lambda j: self.build([j], seed)[0])


def layer_seed(seed: int, index: int) -> int:
    """A 63-bit seed for layer `index`, independent of every other layer's."""
    digest = hashlib.sha256(f"p2psl-layer:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# -- zoo models: per-layer blueprints ----------------------------------------------------------------

def zoo_spec(name: str, input_shape: tuple[int, ...], num_classes: int,
             blueprints: Sequence[Blueprint]) -> ModelSpec:
    """A spec whose layer i is `blueprints[i]()`, initialised per [Note: per-layer init]."""
    blueprints = tuple(blueprints)

    def maker(indices: Sequence[int], seed: int) -> list[nn.Module]:
        return [_materialise(blueprints[i], layer_seed(seed, i)) for i in indices]

    def sketch() -> list[nn.Module]:
        with torch.device("meta"):
            return [blueprint() for blueprint in blueprints]

    key = _facts_key(name, input_shape, num_classes)
    return ModelSpec(name, len(blueprints), tuple(input_shape), num_classes, maker, sketch, key)


def _materialise(blueprint: Blueprint, seed: int) -> nn.Module:
    with torch.device("meta"):
        layer = blueprint()
    layer = layer.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    for module in layer.modules():
        _initialise(module, generator)
    return layer.train()


def _initialise(module: nn.Module, generator: torch.Generator) -> None:
    """PyTorch's default initialisation, drawn from `generator` instead of the global RNG."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
        if module.bias is not None:
            fan_in, _ = init._calculate_fan_in_and_fan_out(module.weight)
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            init.uniform_(module.bias, -bound, bound, generator=generator)
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        module.reset_parameters()  # ones, zeros and fresh running statistics: no randomness
    elif any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False)):
        raise TypeError(f"no deterministic initialisation for {type(module).__name__}")


# -- user factories ------------------------------------------------------------------------------

_FACTORY_LOCK = threading.Lock()


def factory_spec(model: str, input_shape: tuple[int, ...], num_classes: int) -> ModelSpec:
    """A spec from "package.module:factory"; the factory returns a layer list or nn.Sequential."""
    factory = _import_factory(model)
    count = len(_call_factory(model, factory, input_shape, num_classes, seed=0))
    if count == 0:
        raise ConfigError(f"model {model!r}: the factory returned no layers")

    def maker(indices: Sequence[int], seed: int) -> list[nn.Module]:
        layers = _call_factory(model, factory, input_shape, num_classes, seed)
        return [layers[i].train() for i in indices]

    def sketch() -> list[nn.Module]:
        return _call_factory(model, factory, input_shape, num_classes, seed=0)

    return ModelSpec(model, count, tuple(input_shape), num_classes, maker, sketch)


def _import_factory(model: str) -> Callable:
    module_name, sep, attr = model.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"model {model!r}: expected a zoo name or 'package.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure is the user's module, not ours
        raise ConfigError(f"model {model!r}: cannot import {module_name!r}: {exc}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"model {model!r}: module {module_name!r} has no callable {attr!r}")
    return factory


def _call_factory(model: str, factory: Callable, input_shape: tuple[int, ...],
                  num_classes: int, seed: int) -> list[nn.Module]:
    """Call the factory under a seeded global RNG (restored afterwards; serialised by a lock)."""
    with _FACTORY_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(layer_seed(seed, -1))
        try:
            result = factory(tuple(input_shape), num_classes)
        except Exception as exc:
            raise ConfigError(f"model {model!r}: the factory failed: {type(exc).__name__}: {exc}") from None
    layers = list(result) if isinstance(result, (nn.Sequential, list, tuple)) else None
    if layers is None or not all(isinstance(layer, nn.Module) for layer in layers):
        raise ConfigError(f"model {model!r}: the factory must return a list of nn.Module or an "
                          f"nn.Sequential, got {type(result).__name__}")
    return layers


# -- sizes ---------------------------------------------------------------------------------------

def _layer_facts(spec: ModelSpec) -> list[tuple[tuple[int, ...], int]]:
    """(output shape, parameter+buffer bytes) per layer.

    [Note: layer facts cache] They come from one batch-1 pass on the meta device, and that pass
    costs a peer more CPU at start-up than it seems: shape tracing of some layers (Tanh, for one)
    imports torch's compiler stack, ~0.7 s. A zoo model's facts depend only on p2psl's zoo code,
    the torch version and the input and output sizes, so they are kept in the cache folder under
    a key of all four (the code by digest), and in this process; a user's model is sized afresh."""
    if spec.facts_key is None:
        return _measure_facts(spec)
    if spec.facts_key not in _FACTS:
        path = cache_root() / "layers" / f"{spec.facts_key}.json"
        facts = _read_facts(path, spec.num_layers)
        if facts is None:
            facts = _measure_facts(spec)
            try:
                write_atomic(path, json.dumps([[list(shape), size] for shape, size in facts]))
            except OSError:
                pass  # an unwritable cache only costs the next start the pass again
        _FACTS[spec.facts_key] = facts
    return _FACTS[spec.facts_key]


_FACTS: dict[str, list[tuple[tuple[int, ...], int]]] = {}


def _read_facts(path: Path, layers: int) -> list[tuple[tuple[int, ...], int]] | None:
    """The cached facts, or None where missing or not what this model needs (then remade)."""
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
        facts = [(tuple(int(d) for d in shape), int(size)) for shape, size in rows]
    except (OSError, ValueError, TypeError):
        return None
    return facts if len(facts) == layers else None


def _facts_key(name: str, input_shape: Sequence[int], num_classes: int) -> str:
    shape = "x".join(str(int(d)) for d in input_shape)
    return f"{name}-{shape}-{int(num_classes)}-torch{torch.__version__}-{_zoo_digest()}"


@functools.cache
def _zoo_digest() -> str:
    """A digest of the code that builds and sizes zoo layers (this folder's modules)."""
    digest = hashlib.sha256()
    for source in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    return digest.hexdigest()[:12]


def _measure_facts(spec: ModelSpec) -> list[tuple[tuple[int, ...], int]]:
    """One batch-1 pass in eval mode; zoo layers run on the meta device, so sizing VGG-19
    allocates nothing."""
    layers = spec.sketch()
    tensors = (t for layer in layers for t in layer.state_dict().values())
    device = next(tensors, torch.zeros(0)).device
    x = torch.zeros((1, *spec.input_shape), device=device)
    facts = []
    with torch.no_grad():
        for layer in layers:
            x = layer.eval()(x)
            size = sum(t.numel() * t.element_size() for t in layer.state_dict().values())
            facts.append((tuple(x.shape[1:]), size))
    return facts
