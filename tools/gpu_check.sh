#!/usr/bin/env bash
# The GPU check of p2psl: run where a CUDA GPU is available, from the repository's root or anywhere.
#
#   tools/gpu_check.sh [OUTPUT_FOLDER]      (default: runs/gpu_check)
#
# 1. finds a Python with torch and p2psl's dependencies: $PYTHON, else .venv/bin/python, else
#    python3 (this checkout on PYTHONPATH). Nothing is downloaded: torch must already have CUDA.
# 2. stops with exit status 2 and one line if torch has no CUDA or sees no device;
# 3. runs the GPU tests (tests/gpu): they must all run, a skip fails the check;
# 4. benchmarks a ResNet-101 middle part's time per batch on the GPU vs the CPU inside one compute
#    node, and a short deployment with c1 on the GPU vs all on the CPU (tools/bench/gpu.py);
#    the figures go to OUTPUT_FOLDER/gpu_figures.json (the README's Performance section shows them).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${1:-runs/gpu_check}"
mkdir -p "$OUT"

if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PY" - <<'PY'
import importlib, sys
missing = [m for m in ("torch", "aiohttp", "cbor2", "networkx", "highspy", "click", "psutil", "cryptography", "numpy", "matplotlib",
                       "sklearn", "pytest", "pytest_timeout", "pytest_asyncio", "hypothesis")
           if importlib.util.find_spec(m) is None]
if missing:
    print(f"gpu_check: {sys.executable} lacks {', '.join(missing)}: install p2psl with "
          "'pip install -e .[test]' (torch with CUDA) or set PYTHON to a Python that has them", file=sys.stderr)
    sys.exit(2)
PY
then exit 2; fi

if ! "$PY" - <<'PY'
import sys
import torch
if torch.version.cuda is None:
    print(f"gpu_check: this torch ({torch.__version__}) has no CUDA: install a CUDA build of torch "
          "(e.g. the cu12x wheel from download.pytorch.org) in this environment", file=sys.stderr)
    sys.exit(2)
if not torch.cuda.is_available():
    print(f"gpu_check: this torch ({torch.__version__}, CUDA {torch.version.cuda}) sees no CUDA device "
          "(driver, CUDA_VISIBLE_DEVICES?)", file=sys.stderr)
    sys.exit(2)
print(f"gpu_check: torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"{torch.cuda.device_count()} device(s): {torch.cuda.get_device_name(0)}")
PY
then exit 2; fi

echo "gpu_check: GPU tests (tests/gpu)"
set +e
"$PY" -m pytest -q -rs -p no:cacheprovider tests/gpu tests/unit/test_accelerator.py \
    tests/unit/test_planner_accelerator.py 2>&1 | tee "$OUT/gpu_tests.log"
status=${PIPESTATUS[0]}
set -e
if [[ $status -ne 0 ]]; then echo "gpu_check: GPU tests failed (exit $status)" >&2; exit 1; fi
if grep -q "^SKIPPED.*tests/gpu" "$OUT/gpu_tests.log"; then
    echo "gpu_check: GPU tests were skipped on a machine with CUDA: see $OUT/gpu_tests.log" >&2; exit 1
fi

echo "gpu_check: benchmark (ResNet-101 middle part, GPU vs CPU; short deployment)"
"$PY" -m tools.bench.gpu --out "$OUT/gpu_figures.json" --deploy "$OUT/deploy"
"$PY" - "$OUT/gpu_figures.json" <<'PY'
import json, sys
f = json.load(open(sys.argv[1]))
print(f"gpu_check: ResNet-101 layers {f['layers']}, batch {f['cpu']['batch']}: "
      f"CPU {f['cpu']['seconds_per_batch']:.3f} s/batch, GPU {f['gpu']['seconds_per_batch']:.4f} s/batch "
      f"({f['speedup']:.1f}x); GPU peak {f['gpu']['accelerator_peak_bytes'] / 2**20:.0f} MiB")
bad = {k: d["exit_status"] for k, d in f["deployment"].items() if d["exit_status"] != 0}
for k, d in f["deployment"].items():
    print(f"gpu_check: deployment, c1 on {d['c1_accelerator']}: exit {d['exit_status']}, {d['seconds']} s, "
          f"test accuracy {d['test_accuracy']}")
sys.exit(1 if bad else 0)
PY
echo "gpu_check: passed; figures in $OUT/gpu_figures.json"
