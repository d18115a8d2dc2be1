"""Topology files: TOML → validated frozen dataclasses → a networkx graph.

`config` holds the ``[training]`` and ``[timeouts]`` tables, `model` the deployment and its graph,
`parse` reads and validates a file (every problem at once), `reader` the typed-key reading it uses.
"""

from p2psl.topology.config import (
    COMPUTE,
    DATA_OWNER,
    DATASETS,
    MODEL_ZOO,
    MODES,
    OBJECTIVES,
    PARTITIONS,
    ROLES,
    STRAGGLER_POLICIES,
    Timeouts,
    TrainingConfig,
)
from p2psl.topology.model import FREE_LINK, LinkSpec, PeerSpec, Topology
from p2psl.topology.parse import load_topology, parse_topology

__all__ = [
    "COMPUTE",
    "DATASETS",
    "DATA_OWNER",
    "FREE_LINK",
    "MODEL_ZOO",
    "MODES",
    "OBJECTIVES",
    "PARTITIONS",
    "ROLES",
    "STRAGGLER_POLICIES",
    "LinkSpec",
    "PeerSpec",
    "Timeouts",
    "Topology",
    "TrainingConfig",
    "load_topology",
    "parse_topology",
]
