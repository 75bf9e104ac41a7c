"""Real processes beside a store, for the store's tests: one holding its lock, and reaping them."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REAP_S = 30.0

HOLDER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from speakerd.storelock import StoreLock
    lock = StoreLock(Path(sys.argv[1]), sys.argv[2]).acquire()
    print("held", flush=True)
    sys.stdin.read()  # held until the test closes stdin or kills it
    """
)


def reap(proc: subprocess.Popen[str]) -> None:
    """Kill ``proc`` if it still runs, wait for it and close its pipes."""
    if proc.poll() is None:
        proc.kill()
    proc.wait(REAP_S)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


@contextmanager
def lock_held(directory: Path, command: str) -> Iterator[subprocess.Popen[str]]:
    """Another process holding the store lock in ``directory`` as ``command``, until the block ends."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "daemon")}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory), command],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        reap(proc)
