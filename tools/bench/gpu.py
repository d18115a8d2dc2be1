"""GPU vs CPU inside one compute node: a ResNet-101 middle part's time per batch.

The part is what a compute node of the paper's ResNet-101 split holds (layers first_cut + 1 ..
last_cut, CIFAR-10 inputs), trained through `Part` exactly as the runtime does: the activation
arrives in host memory, goes to the part's device, forward, backward from a host gradient, SGD
step, and the input gradient back to the host. Times are medians after a warm-up, each batch
ended by a device synchronisation (the gradient's copy to the host waits for the device anyway).

    python -m tools.bench.gpu --out figures.json [--batch 32] [--repeats 10] [--cpu-repeats 3] [--deploy DIR]

With --deploy, also a short deployment (`p2psl run`, the digits CNN, 2 owners, 2 compute nodes,
3 rounds) twice: all on the CPU, then with c1 on `accelerator = "cuda"`; its seconds, accuracy
and c1's accelerator peak go in the figures. Prints one JSON object; writes it to --out too.
Without CUDA it measures the CPU alone and says so.
"""

from __future__ import annotations

import sys

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

import torch

from p2psl.learning.accelerator import describe, peak_bytes, reset_peak, synchronize
from p2psl.learning.models import OptimConfig, Part, model_spec
from p2psl.runtime.metrics import read_metrics
if __package__ in (None, ""):  # run by path: the repository root holds the tools package
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tools.bench.common import PYTHON, child_env, free_ports

FIRST_CUT, LAST_CUT = 2, 36  # the authors' ResNet-101 split (reference/profiles), 1-based


def time_part(device: torch.device, batch: int, warmup: int, repeats: int, threads: int) -> dict:
    """Median seconds per batch of the middle part on `device`, and its allocator's peak."""
    torch.set_num_threads(threads)
    spec = model_spec("resnet101", (3, 32, 32), 10)
    layers = list(range(FIRST_CUT, LAST_CUT))  # 0-based indices of layers FIRST_CUT+1 .. LAST_CUT
    part = Part(spec.build(layers, 0), layers, OptimConfig(), input_shape=spec.output_shapes()[FIRST_CUT - 1],
                device=device, name="middle")
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *spec.output_shapes()[FIRST_CUT - 1], generator=generator)
    grad = torch.randn(batch, *spec.output_shapes()[LAST_CUT - 1], generator=generator)
    reset_peak(device)
    times = []
    for step in range(warmup + repeats):
        synchronize(device)
        t0 = time.perf_counter()
        part.forward_train(step, x)
        part.backward(step, grad)
        part.step()
        synchronize(device)
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    return {"device": str(device), "about": describe(device), "batch": batch, "repeats": repeats,
            "seconds_per_batch": statistics.median(times), "min_seconds": min(times),
            "parameters": part.num_parameters, "accelerator_peak_bytes": peak_bytes(device)}


def deployment(folder: Path, accelerator: str) -> dict:
    """`p2psl run` of a short deployment with c1 on `accelerator`; its figures from metrics.jsonl."""
    names = [("alice", "data_owner"), ("bob", "data_owner"), ("c1", "compute"), ("c2", "compute")]
    lines = ["[training]", 'model = "cnn"', 'dataset = "digits"', "rounds = 3", "batch_size = 16"]
    for (name, role), port in zip(names, free_ports(len(names))):
        lines += ["[[peer]]", f'name = "{name}"', f'role = "{role}"', f'address = "127.0.0.1:{port}"',
                  'memory = "4GiB"'] + ([f'accelerator = "{accelerator}"'] if name == "c1" else [])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "topology.toml").write_text("\n".join(lines) + "\n")
    started = time.perf_counter()
    done = subprocess.run([PYTHON, "-m", "p2psl", "run", "--topology", str(folder / "topology.toml"), "--out",
                           str(folder / "out"), "--no-dashboard", "--no-baseline"], capture_output=True, text=True,
                          env=child_env(P2PSL_SECRET="gpu-check"), timeout=900)
    seconds = time.perf_counter() - started
    records = read_metrics(folder / "out" / "metrics.jsonl")
    rounds = [r for r in records if r.get("event") == "round"]
    c1 = [r for r in records if r.get("event") == "peer" and r.get("name") == "c1"]
    return {"c1_accelerator": accelerator, "exit_status": done.returncode, "seconds": round(seconds, 2),
            "round_seconds": [r["seconds"] for r in rounds],
            "test_accuracy": rounds[-1]["test_accuracy"] if rounds else None,
            "c1_accelerator_peak_bytes": c1[-1].get("accelerator_peak_bytes") if c1 else None,
            "c1_peak_rss_bytes": c1[-1].get("peak_rss_bytes") if c1 else None,
            "stderr_tail": done.stderr[-2000:] if done.returncode else ""}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--cpu-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (a peer's default is 1)")
    parser.add_argument("--deploy", type=Path, help="folder for the short deployments (none without it)")
    args = parser.parse_args(argv)
    figures = {"model": "resnet101", "layers": f"{FIRST_CUT + 1}-{LAST_CUT}", "input": [3, 32, 32],
               "torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    figures["cpu"] = time_part(torch.device("cpu"), args.batch, 1, args.cpu_repeats, args.threads)
    if torch.cuda.is_available():
        figures["gpu"] = time_part(torch.device("cuda", 0), args.batch, 3, args.repeats, args.threads)
        figures["speedup"] = figures["cpu"]["seconds_per_batch"] / figures["gpu"]["seconds_per_batch"]
    else:
        figures["gpu"] = None
        figures["note"] = f"this torch ({torch.__version__}) has no usable CUDA: CPU figures only"
    if args.deploy:
        figures["deployment"] = {"cpu": deployment(args.deploy / "cpu", "cpu")}
        if torch.cuda.is_available():
            figures["deployment"]["gpu"] = deployment(args.deploy / "gpu", "cuda")
    text = json.dumps(figures, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return figures


if __name__ == "__main__":
    main()
