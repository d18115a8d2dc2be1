"""docs/protocol.md's Appendix A is what tools/protocol_appendix.py generates from p2psl's own
models and data today: regenerate it and compare, so the document cannot drift from the code."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_tool():
    spec = importlib.util.spec_from_file_location("protocol_appendix", ROOT / "tools" / "protocol_appendix.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_appendix_is_the_generated_one():
    tool = load_tool()
    text = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")
    start, stop = text.index(tool.BEGIN), text.index(tool.END) + len(tool.END)
    assert text[start:stop] == tool.appendix(), \
        "docs/protocol.md Appendix A is stale: run .venv/bin/python tools/protocol_appendix.py --write"


def test_the_appendix_names_what_a_third_party_owner_needs():
    """The keys and shapes of the default deployment's model (cnn on digits), as p2psl builds them."""
    from p2psl.learning.models.zoo import model_spec
    spec = model_spec("cnn", (1, 8, 8), 10)
    generated = load_tool().appendix()
    for i, layer in enumerate(spec.sketch()):
        for key, tensor in layer.state_dict().items():
            assert f"`{i}.{key}` [{', '.join(map(str, tensor.shape))}]" in generated
    for j, shape in enumerate(spec.output_shapes(), start=1):
        assert f"| {j} | `{j - 1}.` | [{', '.join(map(str, shape))}] |" in generated
    assert "input [1, 8, 8], 10 classes, 1437 training and 360 test samples" in generated
