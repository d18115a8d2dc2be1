"""The ``[training]`` and ``[timeouts]`` tables as frozen dataclasses, and the names they accept."""

from __future__ import annotations

from dataclasses import dataclass

DATA_OWNER = "data_owner"
COMPUTE = "compute"
ROLES = (DATA_OWNER, COMPUTE)

#: names the model zoo understands; anything else must be "package.module:factory"
MODEL_ZOO = ("mlp", "cnn", "vgg19", "resnet101")
DATASETS = ("digits", "synthetic")
PARTITIONS = ("iid", "dirichlet")
OBJECTIVES = ("time", "memory", "cost")
STRAGGLER_POLICIES = ("wait", "drop")
#: "split": the owners and the chain train the split model; "fedavg": every owner trains the whole
#: model alone and the owners average it (the baseline that shows what splitting costs and saves)
MODES = ("split", "fedavg")


@dataclass(frozen=True)
class TrainingConfig:
    """The ``[training]`` table: what is trained, on what, and how."""

    model: str = "cnn"
    dataset: str = "digits"
    rounds: int = 3
    local_epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    partition: str = "iid"
    alpha: float = 0.5
    seed: int = 0
    first_cut: int | None = None
    last_cut: int | None = None
    profile: str | None = None
    objective: str = "time"
    eval_batch_size: int = 256
    test_fraction: float = 0.2
    synthetic_shape: tuple[int, ...] = (1, 8, 8)
    synthetic_samples: int = 2000
    num_classes: int = 10
    micro_batches: int = 1             # 0: "auto", the planner chooses (`Plan.micro_batches`)
    chains: int = 1                    # 0: "auto", the planner chooses (`Plan.chains`)
    mode: str = "split"
    round_deadline: float | None = None
    deadline: float | None = None      # objective "cost": the longest predicted round a plan may have
    straggler_policy: str = "wait"
    keep_checkpoints: int | None = 2   # the newest rounds each peer keeps on disk; None: all

    @property
    def modelled(self) -> bool:
        """Whether the cost model predicts this training's rounds: a split run (a
        federated-averaging run has no model yet)."""
        return self.mode == "split"


@dataclass(frozen=True)
class Timeouts:
    """Every network wait has a deadline from here (the ``[timeouts]`` table; tests shrink them)."""

    connect: float = 60.0        # how long to keep dialling a neighbour before giving up
    handshake: float = 10.0      # one authentication handshake
    heartbeat: float = 1.0       # interval between pings on an idle connection
    dead: float = 6.0            # silence after which a link is declared down
    gone: float = 4.0            # a link down this long (after `dead`, or a closed connection) means the peer is gone
    request: float = 120.0       # one reply (a batch's activations, a part to aggregate)
    start: float = 120.0         # agreeing on a plan at start-up
    round: float = 3600.0        # the longest a round may take before the peers give up
    closing: float = 2.0         # on the way out: a bye, an abort, an error reply; closing a link


