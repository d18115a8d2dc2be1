"""Peers started by `p2psl run` end when it ends, however it ends.

The launcher puts its own process id in `PARENT_ENV` for the peers it starts. Such a peer asks
the kernel to send it SIGTERM when its parent dies (Linux `prctl(PR_SET_PDEATHSIG)`), and a
watchdog thread checks every second that its parent is still the same process — for systems
without prctl, and for a parent that died before the peer got as far as asking. A peer started
by hand has no such variable and lives on its own.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading

PARENT_ENV = "P2PSL_PARENT_PID"
PR_SET_PDEATHSIG = 1
WATCH_SECONDS = 1.0


def follow_parent() -> None:
    """If a launcher started this process, end it (SIGTERM) once the launcher is gone."""
    try:
        parent = int(os.environ.pop(PARENT_ENV, ""))
    except ValueError:
        return
    _ask_the_kernel()
    if os.getppid() != parent:  # it died before we asked
        _end()
    threading.Thread(target=_watch, args=(parent,), name="p2psl-parent", daemon=True).start()


def _ask_the_kernel() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the watchdog alone
        pass


def _watch(parent: int) -> None:
    stop = threading.Event()
    while not stop.wait(WATCH_SECONDS):
        if os.getppid() != parent:
            _end()
            return


def _end() -> None:
    os.kill(os.getpid(), signal.SIGTERM)
