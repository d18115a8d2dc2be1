"""The command lines of the tools: a typo in what to run is bad input (exit 2), never a run of
nothing that reports success."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, cwd="/")


def test_the_benchmark_suite_refuses_an_unknown_module_and_an_unreadable_merge(tmp_path):
    result = tool(str(ROOT / "tools/bench/run.py"), "--out", str(tmp_path), "--only", "memroy")
    assert result.returncode == 2 and "--only: no module memroy (the modules: memory," in result.stderr
    assert not (tmp_path / "results.json").exists()
    (tmp_path / "results.json").write_text("{not json")
    result = tool(str(ROOT / "tools/bench/run.py"), "--out", str(tmp_path), "--only", "planner", "--merge")
    assert result.returncode == 2 and "is not a results file" in result.stderr
    assert (tmp_path / "results.json").read_text() == "{not json"  # left as it was


def test_the_drill_refuses_an_unknown_case():
    result = tool(str(ROOT / "tools/drill.py"), "--only", "clean", "no-such-case")
    assert result.returncode == 2 and "--only: no case no-such-case" in result.stderr


@pytest.mark.parametrize("module", ["memory", "planner", "transport", "owners", "gpu", "scaling", "deploy",
                                    "bundled", "chains", "costmodel", "fedavg", "floor", "microbatch", "pingpong"])
def test_every_benchmark_module_runs_by_its_path_from_anywhere(module):
    result = tool(str(ROOT / "tools" / "bench" / f"{module}.py"), "--help")
    assert result.returncode == 0, result.stderr
