"""[Note: layer facts cache]: a zoo model's layer shapes and sizes come from the cache folder once
measured, equal to a fresh measurement, without torch's compiler stack; a user's model is
measured every time; a damaged cache file is measured again."""

from __future__ import annotations

import os
import subprocess
import sys

from p2psl.learning.models import model_spec
from p2psl.learning.models import spec as spec_module


def test_zoo_facts_are_cached_equal_to_a_fresh_measurement(tmp_path, monkeypatch):
    monkeypatch.setenv("P2PSL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(spec_module, "_FACTS", {})
    model = model_spec("cnn", (1, 8, 8), 10)
    fresh = spec_module._measure_facts(model)
    assert model.output_shapes() == [shape for shape, _ in fresh]
    assert model.parameter_bytes() == [size for _, size in fresh]
    (cached,) = (tmp_path / "layers").glob("cnn-1x8x8-10-*.json")
    probe = ("import sys; from p2psl.learning.models import model_spec; "
             "m = model_spec('cnn', (1, 8, 8), 10); print(m.output_shapes(), m.parameter_bytes(), "
             "'torch._dynamo' in sys.modules)")
    shown = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                           env={**os.environ, "P2PSL_CACHE_DIR": str(tmp_path)}).stdout.strip()
    assert shown == f"{[s for s, _ in fresh]} {[b for _, b in fresh]} False"
    cached.write_text("[[1, 2]")
    monkeypatch.setattr(spec_module, "_FACTS", {})
    assert model_spec("cnn", (1, 8, 8), 10).output_shapes() == [shape for shape, _ in fresh]
    assert cached.read_text().startswith("[[[16, 8, 8], 640]")


def test_other_sizes_have_their_own_entry_and_user_models_none(tmp_path, monkeypatch):
    monkeypatch.setenv("P2PSL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(spec_module, "_FACTS", {})
    assert model_spec("cnn", (1, 8, 8), 10).output_shapes()[-1] == (10,)
    assert model_spec("cnn", (1, 8, 8), 4).output_shapes()[-1] == (4,)
    assert len(list((tmp_path / "layers").glob("*.json"))) == 2
    user = model_spec("tests.integration.test_calibration:wide_model", (64,), 4)
    assert user.facts_key is None and user.output_shapes()[-1] == (4,)
    assert len(list((tmp_path / "layers").glob("*.json"))) == 2
