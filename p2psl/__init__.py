"""p2psl: a peer-to-peer runtime for multihop parallel split learning."""

__version__ = "0.1.0"

#: Version of the wire protocol spoken by this release (see docs/protocol.md).
PROTOCOL_VERSION = 2
