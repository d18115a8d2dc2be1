import fcntl
import logging
import os
import tempfile
from pathlib import Path

import pytest

logging.getLogger("p2psl").setLevel(logging.DEBUG)

#: one lock file for every test run on this machine (pytest-xdist workers, or suites run at once)
LOCK = Path(tempfile.gettempdir()) / f"p2psl-tests-{os.getuid()}.lock"


@pytest.fixture(autouse=True)
def _share_the_machine(request):
    """A test marked `alone` compares times measured on this machine, so it runs while no other
    test does (an exclusive lock); every other test holds the lock shared and runs beside the
    others. With one pytest process the lock is always free."""
    exclusive = request.node.get_closest_marker("alone") is not None
    with open(LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
