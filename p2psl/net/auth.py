"""The deployment secret, the challenge–response proofs and per-frame MACs. Pure, no I/O.

Handshake (docs/protocol.md, "Handshake"): the dialler sends a fresh nonce Nd, the listener
answers with its nonce Nl and proof Pl = HMAC(secret, "p2psl-listener" ‖ transcript); the dialler
checks Pl and answers Pd = HMAC(secret, "p2psl-dialler" ‖ transcript). The transcript binds both
nonces, both names, the protocol version and the topology digest, so a proof is useless on any
other connection. The secret itself never crosses the wire.

After the handshake each direction has its own 32-byte session key, K = HMAC(secret, label ‖
transcript), and every frame ends with a 16-byte tag: AES-256-GMAC under K — AES-GCM with an empty
plaintext and the frame as associated data — with the 12-byte nonce 0⁴ ‖ u64(seq), where seq counts
the frames sent in that direction from 0. A frame replayed from another connection (other key) or
replayed, dropped or reordered within one (other seq) fails the check. GMAC runs at memory speed
with AES instructions (an HMAC-SHA256 tag cost more CPU than all the rest of the transport), and
a key never sees a nonce twice: keys are per connection and direction, and seq only grows.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import struct
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from p2psl import PROTOCOL_VERSION
from p2psl.errors import ConfigError, RemoteProtocolError

NONCE_BYTES = 32
MAC_BYTES = 16
SECRET_ENV = "P2PSL_SECRET"
_SEQ = struct.Struct(">Q")


def load_secret(secret_file: str | os.PathLike | None = None) -> bytes:
    """The deployment secret from `--secret-file` or $P2PSL_SECRET (a file wins)."""
    if secret_file is not None:
        try:
            text = Path(secret_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read the secret file {secret_file}: {exc}") from None
        if not text:
            raise ConfigError(f"the secret file {secret_file} is empty")
        return text.encode()
    value = os.environ.get(SECRET_ENV, "").strip()
    if not value:
        raise ConfigError(f"no secret: set {SECRET_ENV} or pass --secret-file (every peer of a deployment "
                          "needs the same secret)")
    return value.encode()


def new_secret() -> str:
    """A fresh random secret (what `p2psl run` gives its own local peers)."""
    return secrets.token_urlsafe(32)


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def transcript(dialler: str, listener: str, digest: str, dialler_nonce: bytes, listener_nonce: bytes) -> bytes:
    """Everything a proof commits to; length-prefixed so no two transcripts collide."""
    parts = [str(PROTOCOL_VERSION).encode(), dialler.encode(), listener.encode(), digest.encode(),
             dialler_nonce, listener_nonce]
    return b"".join(struct.pack(">I", len(p)) + p for p in parts)


def proof(secret: bytes, side: str, script: bytes) -> bytes:
    """The proof of knowledge of `secret` for `side` ("dialler" or "listener")."""
    return hmac.new(secret, b"p2psl-" + side.encode() + script, hashlib.sha256).digest()


def check_proof(secret: bytes, side: str, script: bytes, claimed: bytes) -> bool:
    return hmac.compare_digest(proof(secret, side, script), claimed)


def session_keys(secret: bytes, script: bytes) -> tuple[bytes, bytes]:
    """(dialler → listener key, listener → dialler key)."""
    return proof(secret, "key-d2l", script), proof(secret, "key-l2d", script)


class Sealer:
    """Appends the MAC to each outgoing frame of one direction."""

    def __init__(self, key: bytes):
        self._gmac = AESGCM(key)
        self._seq = 0

    def seal(self, frame: bytes) -> bytes:
        tag = self._gmac.encrypt(_nonce(self._seq), b"", frame)
        self._seq += 1
        return frame + tag


class Opener:
    """Checks and strips the MAC of each incoming frame of one direction."""

    def __init__(self, key: bytes):
        self._gmac = AESGCM(key)
        self._seq = 0

    def open(self, frame: bytes) -> memoryview:
        view = memoryview(frame)
        if len(view) < MAC_BYTES:
            raise RemoteProtocolError("frame too short to carry its MAC", "bad_mac")
        body, tag = view[:-MAC_BYTES], view[-MAC_BYTES:]
        try:
            self._gmac.decrypt(_nonce(self._seq), bytes(tag), body)
        except InvalidTag:
            raise RemoteProtocolError(f"frame {self._seq} fails its MAC (forged, replayed or reordered)",
                                      "bad_mac") from None
        self._seq += 1
        return body


def _nonce(seq: int) -> bytes:
    return b"\0\0\0\0" + _SEQ.pack(seq)
