"""Per-layer profiles: what each indivisible layer costs on one device.

A `Profile` holds, for every layer j of a model, the seconds one batch spends in its forward pass,
its backward pass and its optimizer step, the bytes of its output activation and the bytes of its
parameters. Profiles come from three places:

- `read_profile_csv`: the table format of ``shared/reference/profiles/`` (SPEC §5), one column
  triple per device, times in milliseconds and sizes in KiB for one batch of the size in the
  file name (``_bs128``);
- `measure_profile`: timing the layers on this CPU (median of a few batches after warm-up);
  a peer times only the layers a plan can give it and caches them (p2psl.planning.profiling);
- `Profile.from_json`: a profile another peer measured and sent (plain JSON types, so it travels
  inside a CBOR message).

`peer_profiles` turns these into one profile per peer of a topology, at the training batch size,
with the peer's relative speed applied.

[Note: gaps in a profile table] The authors' Raspberry Pi 3B+ columns (``d2``) are 0 wherever the
device ran out of memory; the VM columns are also 0 for the two cheapest layers of ResNet-101. A
row of three zeros on one device while another device measured a positive time is a *gap*, not
free work: taken at face value it would invite the planner to give that device the layers it could
not run. `read_profile_csv` therefore estimates each gap by scaling the other devices' times for
that layer by this device's measured speed ratio to them (the median over the devices), and lists
the estimated layers in `Profile.estimated`. ``gaps="keep"`` keeps the zeros as they are. Memory
limits are the topology's job (a peer's ``memory``), not the profile's.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import math
import os
import re
import statistics
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from collections.abc import Mapping, Sequence

from p2psl.errors import ConfigError
from p2psl.planning.measure import measure_layer, no_sync, synchronizer

KIB = 1024
_KINDS = ("fwd", "bwd", "opt")
_BATCH_IN_NAME = re.compile(r"_bs(\d+)(?:\D|$)")

#: default device columns for peers without ``device`` when a profile table is given
DEFAULT_DEVICE = {"compute": "VM", "data_owner": "d1"}


@dataclass(frozen=True)
class Profile:
    """Per-layer costs of one model on one device, for batches of `batch_size` samples.

    `fwd`, `bwd` and `opt` are seconds per batch; `act_bytes` is each layer's output activation
    per batch; `param_bytes` its weights. `estimated` lists 1-based layers whose times were
    estimated rather than measured (see [Note: gaps in a profile table]); `unmeasured` those a
    peer did not time because no plan can give them to it (their times are 0, their sizes come
    from the model's shapes; [Note: profiling what a peer may hold]). `cores` is how many
    cores the measuring peer's machine offers it (0: not known), which peers sharing a machine
    plan with when the topology does not say (p2psl.planning.hosts).
    """

    device: str
    batch_size: int
    fwd: tuple[float, ...]
    bwd: tuple[float, ...]
    opt: tuple[float, ...]
    act_bytes: tuple[int, ...]
    param_bytes: tuple[int, ...]
    estimated: tuple[int, ...] = field(default=())
    cores: int = 0
    unmeasured: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        problems = _problems(self)
        if problems:
            raise ValueError("invalid profile: " + "; ".join(problems))

    @property
    def num_layers(self) -> int:
        return len(self.fwd)

    def measured(self, j: int) -> bool:
        """Whether 0-based layer `j` has times, so that a plan may give it to this peer."""
        return j + 1 not in self.unmeasured

    def total(self, j: int) -> float:
        """fwd + bwd + opt of 0-based layer `j`: what one batch costs the holder of that layer."""
        return self.fwd[j] + self.bwd[j] + self.opt[j]

    def scaled(self, speed: float) -> Profile:
        """The same layers on a device `speed` times as fast (times ÷ speed, sizes unchanged)."""
        if not speed > 0:
            raise ValueError(f"speed must be positive, got {speed!r}")
        if speed == 1:
            return self
        return replace(self, fwd=_div(self.fwd, speed), bwd=_div(self.bwd, speed), opt=_div(self.opt, speed))

    def at_batch(self, batch_size: int) -> Profile:
        """The profile for batches of `batch_size`, assuming costs linear in the batch size.

        Times and activations scale by batch_size / self.batch_size; parameters and optimizer
        steps do not depend on the batch. Linear scaling is an approximation: small batches use
        the cores less efficiently, so times below the measured size are somewhat optimistic and
        fixed per-call overheads are spread too thinly. Measure at the training batch size when
        the prediction matters.
        """
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size!r}")
        if batch_size == self.batch_size:
            return self
        r = batch_size / self.batch_size
        return replace(
            self,
            batch_size=batch_size,
            fwd=tuple(t * r for t in self.fwd),
            bwd=tuple(t * r for t in self.bwd),
            act_bytes=tuple(int(round(a * r)) for a in self.act_bytes),
        )

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types (str, int, float, lists), suitable for a CBOR message or a file."""
        return {
            "device": self.device,
            "batch_size": self.batch_size,
            "fwd": list(self.fwd),
            "bwd": list(self.bwd),
            "opt": list(self.opt),
            "act_bytes": list(self.act_bytes),
            "param_bytes": list(self.param_bytes),
            "estimated": list(self.estimated),
            **({"cores": self.cores} if self.cores else {}),
            **({"unmeasured": list(self.unmeasured)} if self.unmeasured else {}),
        }

    @classmethod
    def from_json(cls, data: Any) -> Profile:
        """Validate and build; raises ValueError naming the bad field (callers wrap it in the
        error type of their boundary: ConfigError for a file, RemoteProtocolError for a peer)."""
        if not isinstance(data, dict):
            raise ValueError(f"a profile must be an object, got {type(data).__name__}")
        missing = [k for k in ("device", "batch_size", *_KINDS, "act_bytes", "param_bytes") if k not in data]
        if missing:
            raise ValueError(f"profile is missing {', '.join(missing)}")
        device, batch = data["device"], data["batch_size"]
        if not isinstance(device, str) or not device:
            raise ValueError(f"profile device must be a non-empty string, got {device!r}")
        if not _is_int(batch) or batch < 1:
            raise ValueError(f"profile batch_size must be a positive integer, got {batch!r}")
        times = {k: _numbers(data[k], k, float) for k in _KINDS}
        sizes = {k: _numbers(data[k], k, int) for k in ("act_bytes", "param_bytes")}
        estimated = _numbers(data.get("estimated", []), "estimated", int)
        cores = data.get("cores", 0)
        if not _is_int(cores) or not 0 <= cores <= 1 << 16:
            raise ValueError(f"profile cores must be a non-negative integer, got {cores!r}")
        unmeasured = _numbers(data.get("unmeasured", []), "unmeasured", int)
        return cls(device, batch, times["fwd"], times["bwd"], times["opt"],
                   sizes["act_bytes"], sizes["param_bytes"], estimated, cores, unmeasured)


def _div(values: tuple[float, ...], by: float) -> tuple[float, ...]:
    return tuple(v / by for v in values)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _finite(v: int | float) -> bool:
    """Whether `v` is a finite number a float can hold (an integer from the wire may be any size)."""
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def _numbers(values: Any, name: str, kind: type) -> tuple:
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"profile {name} must be a list, got {type(values).__name__}")
    ok = _is_int if kind is int else (lambda v: _is_int(v) or isinstance(v, float))
    for index, v in enumerate(values):
        if not ok(v) or not _finite(v) or v < 0:
            raise ValueError(f"profile {name}[{index}] must be a non-negative finite number, got {v!r:.40}")
    return tuple(kind(v) for v in values)


def _problems(p: Profile) -> list[str]:
    n = len(p.fwd)
    out = [] if n >= 1 else ["no layers"]
    for name in ("bwd", "opt", "act_bytes", "param_bytes"):
        if len(getattr(p, name)) != n:
            out.append(f"{name} has {len(getattr(p, name))} entries, fwd has {n}")
    for name in ("estimated", "unmeasured"):
        if any(not 1 <= j <= n for j in getattr(p, name)):
            out.append(f"{name} layers must be in 1..{n}")
    return out


# -- profile tables (CSV) ------------------------------------------------------------------------

def csv_devices(header: Sequence[str]) -> list[str]:
    """The devices a profile table has columns for, in column order."""
    return [c[: -len("_fwd_ms")] for c in header if c.endswith("_fwd_ms")]


def read_profile_csv(path: str | Path, device: str, batch_size: int | None = None,
                     gaps: str = "estimate") -> Profile:
    """Read one device's columns of a profile table (ms → s, KiB → bytes).

    The batch size comes from `batch_size` or else the file name (``..._bs128.csv``). `gaps` is
    "estimate" or "keep" (see [Note: gaps in a profile table]). Every problem raises ConfigError
    naming the file and the column.
    """
    path = Path(path)
    header, rows = _read_table(path)
    devices = csv_devices(header)
    if device not in devices:
        raise ConfigError(f"{path}: no columns for device {device!r} (the file has {', '.join(devices) or 'none'})")
    batch = batch_size or _batch_from_name(path)
    _check_layers(path, rows)
    times = {d: {k: _column(path, rows, f"{d}_{k}_ms", 1e-3) for k in _KINDS} for d in devices}
    act = [int(round(v)) for v in _column(path, rows, "act_KiB", KIB)]
    par = [int(round(v)) for v in _column(path, rows, "param_KiB", KIB)]
    own, estimated = times[device], ()
    if gaps == "estimate":
        own, estimated = _fill_gaps(device, times)
    elif gaps != "keep":
        raise ValueError(f"gaps must be 'estimate' or 'keep', got {gaps!r}")
    return Profile(device, batch, tuple(own["fwd"]), tuple(own["bwd"]), tuple(own["opt"]),
                   tuple(act), tuple(par), estimated)


def _read_table(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = list(reader.fieldnames or [])
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the profile: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(f"{path}: not a CSV profile table: {exc}") from None
    for column in ("layer", "act_KiB", "param_KiB"):
        if column not in header:
            raise ConfigError(f"{path}: missing column {column!r} (expected layer, act_KiB, param_KiB, "
                              "then DEVICE_fwd_ms, DEVICE_bwd_ms, DEVICE_opt_ms per device)")
    for d in csv_devices(header):
        for k in ("bwd", "opt"):
            if f"{d}_{k}_ms" not in header:
                raise ConfigError(f"{path}: device {d!r} has no column {d}_{k}_ms")
    if not rows:
        raise ConfigError(f"{path}: the profile table has no layers")
    return header, rows


def _batch_from_name(path: Path) -> int:
    match = _BATCH_IN_NAME.search(path.stem)
    if not match or int(match.group(1)) < 1:
        raise ConfigError(f"{path}: cannot tell the batch size: name the file like 'model_bs128.csv' "
                          "or give the batch size explicitly")
    return int(match.group(1))


def _check_layers(path: Path, rows: list[dict[str, str]]) -> None:
    for index, row in enumerate(rows, start=1):
        value = (row.get("layer") or "").strip()
        if value != str(index):
            raise ConfigError(f"{path}: column 'layer', row {index}: expected layer {index}, got {value!r} "
                              "(layers must be numbered 1, 2, 3, … without gaps)")


def _column(path: Path, rows: list[dict[str, str]], column: str, factor: float) -> list[float]:
    out = []
    for index, row in enumerate(rows, start=1):
        text = (row.get(column) or "").strip()
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"{path}: column {column!r}, layer {index}: expected a non-negative number, got {text!r}")
        out.append(value * factor)
    return out


def _fill_gaps(device: str, times: dict[str, dict[str, list[float]]]) -> tuple[dict[str, list[float]], tuple[int, ...]]:
    """Estimate the all-zero rows of `device` from the other devices (see the module note)."""
    own = {k: list(v) for k, v in times[device].items()}
    total = _row_totals(times)
    estimated = []
    for j in range(len(own["fwd"])):
        donors = [d for d in times if d != device and total[d][j] > 0]
        if total[device][j] > 0 or not donors:
            continue
        ratios = {d: _speed_ratio(total[device], total[d]) for d in donors}
        for k in _KINDS:
            own[k][j] = statistics.median(times[d][k][j] * ratios[d] for d in donors)
        estimated.append(j + 1)
    return own, tuple(estimated)


def _row_totals(times: dict[str, dict[str, list[float]]]) -> dict[str, list[float]]:
    return {d: [sum(v) for v in zip(*(times[d][k] for k in _KINDS))] for d in times}


def _speed_ratio(mine: list[float], theirs: list[float]) -> float:
    """Σ my time / Σ their time over the layers both measured (1.0 when none)."""
    both = [(m, t) for m, t in zip(mine, theirs) if m > 0 and t > 0]
    if not both:
        return 1.0
    return sum(m for m, _ in both) / sum(t for _, t in both)


# -- measuring ------------------------------------------------------------------------------------

def measure_profile(layers: Sequence[Any], input_shape: Sequence[int], batch_size: int, warmup: int = 2,
                    repeats: int = 5, device_name: str = "local", device: Any = None) -> Profile:
    """Time each layer on this CPU with one torch thread, as a peer trains (or on its accelerator `device`).

    For each layer: forward, backward (with the input needing a gradient, except the first
    layer, whose input is data) and an SGD-with-momentum step, each the median of `repeats`
    runs after `warmup`. Copies of the layers are timed (the caller's weights never change), and
    the thread count is restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = torch.randn(batch_size, *input_shape).to(device or "cpu")
        rows = []
        for index, layer in enumerate(layers):
            row, x = measure_layer(copy.deepcopy(layer).to(device or "cpu").train(), x, index > 0, warmup, repeats,
                                   synchronizer(device))
            rows.append(row)
    finally:
        torch.set_num_threads(threads)
    fwd, bwd, opt, act, par = zip(*rows)
    return Profile(device_name, batch_size, fwd, bwd, opt, act, par)


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the system has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cache_root() -> Path:
    """Where p2psl keeps what it measured or prepared once for every later run:
    $P2PSL_CACHE_DIR, or ~/.cache/p2psl."""
    root = os.environ.get("P2PSL_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "p2psl"


def cache_dir_default() -> Path:
    """$P2PSL_CACHE_DIR/profiles, or ~/.cache/p2psl/profiles."""
    return cache_root() / "profiles"


#: changes the cache's file names when what a cached profile means changes: 2 = timed one peer of a
#: machine at a time ([Note: measuring in turn]); 3 = on the CPU, the timing thread's CPU time
#: ([Note: timing under interference]); older files may hold time other processes took
CACHE_FORMAT = 3


def cache_key(model_name: str, input_shape: Sequence[int], batch_size: int, device: Any = None) -> str:
    """File stem for a measured profile: model, input shape, batch size, torch version and the
    accelerator's name when not the CPU (a GPU's profile is not a CPU's)."""
    import torch

    shape = "x".join(str(int(s)) for s in input_shape)
    where = f"-{torch.cuda.get_device_name(device)}" if synchronizer(device) is not no_sync else ""
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{model_name}-{shape}-bs{batch_size}-torch{torch.__version__}{where}")
    digest = hashlib.sha256(f"{CACHE_FORMAT}:{readable}".encode()).hexdigest()[:10]
    return f"{readable[:80]}-{digest}"


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` (its folder made) so that no reader ever sees half of it, even
    with several peers of one machine writing the same cache file at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# -- one profile per peer ------------------------------------------------------------------------

def default_device(role: str, devices: Sequence[str]) -> str:
    """The columns for a peer that names no device: "VM" for compute nodes and "d1" for data
    owners (the authors' set-up), else the table's first device."""
    preferred = DEFAULT_DEVICE.get(role)
    return preferred if preferred in devices else devices[0]


def peer_profiles(topology: Any, measured: Profile | Mapping[str, Profile] | None = None) -> dict[str, Profile]:
    """Each peer's profile at the training batch size.

    - ``[training] profile`` set: each peer gets its device's columns (see `default_device`),
      times divided by its ``speed``;
    - else a single measured profile: the same for every peer, divided by its ``speed``;
    - else a mapping of profiles each peer measured on its own hardware: used as they are.
    """
    batch = topology.training.batch_size
    if topology.training.profile:
        return _from_table(topology, topology.training.profile, batch)
    if isinstance(measured, Profile):
        return {p.name: measured.scaled(p.speed).at_batch(batch) for p in topology.peers}
    if measured is None:
        raise ConfigError("no profile: set [training] profile to a table or measure the layers first")
    missing = [p.name for p in topology.peers if p.name not in measured]
    if missing:
        raise ConfigError(f"no profile for {', '.join(missing)}")
    return {p.name: measured[p.name].at_batch(batch) for p in topology.peers}


def _from_table(topology: Any, path: str, batch: int) -> dict[str, Profile]:
    header, _ = _read_table(Path(path))
    devices = csv_devices(header)
    if not devices:
        raise ConfigError(f"{path}: no device columns (DEVICE_fwd_ms, DEVICE_bwd_ms, DEVICE_opt_ms)")
    tables: dict[str, Profile] = {}
    out = {}
    for peer in topology.peers:
        device = peer.device or default_device(peer.role, devices)
        if device not in devices:
            raise ConfigError(f"peer {peer.name!r}: device {device!r} has no columns in {path} "
                              f"(the file has {', '.join(devices)})")
        if device not in tables:
            tables[device] = read_profile_csv(path, device)
        out[peer.name] = tables[device].scaled(peer.speed).at_batch(batch)
    return out
