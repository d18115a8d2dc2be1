"""Planner solve times: now `tools/bench/planner.py` (part of `tools/bench/run.py`); this keeps
the old command working.

    .venv/bin/python tools/bench_planner.py [--sizes 37x5,100x8] [--free-cuts] [--method milp]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.bench.planner import main  # noqa: E402

if __name__ == "__main__":
    main()
