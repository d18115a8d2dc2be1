"""One exception tree for everything p2psl raises on purpose.

    P2PSLError
    ├── ConfigError             a local file or flag is wrong (exit status 2)
    │   └── TopologyError       every problem of a topology file, collected
    ├── PlanError
    │   ├── PlanInfeasible      no plan satisfies the constraints; names the binding one (exit 2)
    │   └── PlanMismatch        peers derived different plans from the same inputs
    ├── ProtocolError
    │   ├── LocalProtocolError  *we* are about to break the protocol (a bug on this side)
    │   └── RemoteProtocolError the remote sent something that breaks the protocol
    ├── AuthError               the handshake failed: wrong secret, version or topology
    ├── TransportError
    │   ├── ClosedError         we closed the connection ourselves
    │   └── BrokenError         the remote end or the network broke it
    ├── PeerTimeout             a network wait passed its deadline
    ├── RemoteError             a remote answered with a typed error message
    ├── NotAdmitted             the running deployment will not take this peer in
    └── TrainingError           the training run cannot go on (e.g. shapes at a cut disagree)

The split between Local/Remote and Closed/Broken follows h11 and trio: the caller needs to know
whose fault a failure is to decide whether to retry, reconnect or stop.
"""

from __future__ import annotations

import sys


class P2PSLError(Exception):
    """Base of every error p2psl raises deliberately."""

    #: process exit status the command line uses for this error
    exit_code = 1


class ConfigError(P2PSLError):
    """A local input (topology file, flag, secret file, data file) is unusable."""

    exit_code = 2


class TopologyError(ConfigError):
    """A topology file has one or more problems; `problems` lists every one of them."""

    def __init__(self, problems: list[str], source: str = "topology"):
        self.problems = list(problems)
        self.source = source
        count = len(self.problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{source}: {count} problem{'s' if count != 1 else ''}\n{lines}")


class PlanError(P2PSLError):
    """Planning failed."""


class PlanInfeasible(PlanError):
    """No plan satisfies the constraints; the message names the constraint that binds."""

    exit_code = 2


class PlanMismatch(PlanError):
    """Two peers computed different plans (different digests) from what should be equal inputs."""


class ProtocolError(P2PSLError):
    """Something violates the wire protocol."""


class LocalProtocolError(ProtocolError):
    """This side tried to send something the protocol forbids."""


class RemoteProtocolError(ProtocolError):
    """The remote sent something the protocol forbids. `code` is the wire error code."""

    def __init__(self, message: str, code: str = "bad_message", seq: int | None = None):
        super().__init__(message)
        self.code = code
        self.seq = seq  # the link-session number of the refused message, when its header was readable


class AuthError(P2PSLError):
    """The handshake failed (wrong or missing secret, other protocol version or topology).
    `code` is the wire code of the refusal when there is one; `peer` the peer it concerns, when
    its name is known."""

    def __init__(self, message: str, code: str = "", peer: str | None = None):
        super().__init__(message)
        self.code = code
        self.peer = peer


class TransportError(P2PSLError):
    """A connection cannot carry messages any more."""


class ClosedError(TransportError):
    """We closed the connection; using it afterwards is a bug on this side."""


class BrokenError(TransportError):
    """The remote end or the network closed the connection under us."""


class PeerTimeout(P2PSLError):
    """A wait on the network passed its deadline."""


class RemoteError(P2PSLError):
    """A remote peer answered with an error message; re-raised here with its code."""

    def __init__(self, peer: str, code: str, message: str):
        super().__init__(f"{peer} reported {code}: {message}")
        self.peer = peer
        self.code = code


class NotAdmitted(P2PSLError):
    """The running deployment will not take this peer in (a compute node coming back mid-run)."""


class TrainingError(P2PSLError):
    """Training cannot continue (for example the tensors at a cut do not fit the plan)."""


def report(exc: BaseException) -> int:
    """Say `exc` in one line on stderr ("TypeName: message") and return the exit status for it:
    the error's own for a P2PSLError, 1 for an operating-system failure. What every command and
    tool does with an error it expected."""
    print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
    return exc.exit_code if isinstance(exc, P2PSLError) else 1
