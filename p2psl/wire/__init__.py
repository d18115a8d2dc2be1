"""Bytes on the wire and on disk: message kinds, the codec, checkpoint files. Pure: no sockets."""
