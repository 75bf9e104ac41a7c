"""One owner at a time for a speaker store: an flock on ``store.lock`` in the store folder.

``speakerd run`` holds it for its whole life, so a second daemon on the same store refuses to start
(two daemons would each keep their own matcher, and a ``forget`` through one would leave the voice
live in the other). Offline edits (``speakers rename/remove/recover``) hold it for the edit, so they
never change a store a daemon is serving behind its back. The kernel releases an flock when its
process dies, kill -9 included, so a crash never leaves the store locked; the file itself stays
(deleting a lock file races with the next locker) and only says who holds it: pid and command.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from .errors import SpeakerdError

logger = logging.getLogger(__name__)

LOCK_NAME = "store.lock"
FILE_MODE = 0o600
RUN_COMMAND = "speakerd run"
POLL_S = 0.05
"""How often a waiting locker retries (flock has no timeout of its own)."""


class StoreBusy(SpeakerdError):
    """Another process holds the store: a message naming it, exit 2."""

    exit_code = 2

    def __init__(self, message: str, holder: Holder | None) -> None:
        super().__init__(message)
        self.holder = holder


@dataclass(frozen=True)
class Holder:
    """Who holds a store's lock, as it wrote itself into the lock file."""

    pid: int
    command: str

    @property
    def is_daemon(self) -> bool:
        return self.command == RUN_COMMAND

    def __str__(self) -> str:
        return f"`{self.command}` (pid {self.pid})"


def _read_holder(fd: int) -> Holder | None:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"null")
        return Holder(int(data["pid"]), str(data["command"]))
    except (OSError, ValueError, TypeError, KeyError):
        return None  # written by nobody yet, or being rewritten this instant


class StoreLock:
    """The exclusive lock of the store in ``directory``; a context manager that releases it."""

    def __init__(self, directory: Path, command: str) -> None:
        self.path = Path(directory) / LOCK_NAME
        self.command = command
        self._fd: int | None = None

    def acquire(self, wait_s: float = 0.0) -> StoreLock:
        """Take the lock, waiting up to ``wait_s`` for a short holder (an offline edit); a daemon
        holds it for its life, so it is refused at once. Raises ``StoreBusy`` naming the holder."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _read_holder(fd)
                if (holder is not None and holder.is_daemon) or time.monotonic() >= deadline:
                    os.close(fd)
                    raise StoreBusy(self._busy_message(holder), holder) from None
                time.sleep(POLL_S)  # polling the lock under a deadline
            except BaseException:
                os.close(fd)
                raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "command": self.command}).encode(), 0)
        os.chmod(self.path, FILE_MODE)
        self._fd = fd
        return self

    def _busy_message(self, holder: Holder | None) -> str:
        who = str(holder) if holder else "another process"
        store = self.path.parent
        if self.command == RUN_COMMAND and holder is not None and holder.is_daemon:
            return (
                f"the speaker store {store} is already in use by {who}; two daemons on one store would "
                f"each keep their own speakers. Stop that one first, or give this one another --store DIR"
            )
        if holder is not None and holder.is_daemon:
            return (
                f"the speaker store {store} is in use by {who}; `{self.command}` would change it behind "
                f"that daemon's back. Send the change through it (`speakerd speakers ... --control "
                f"ENDPOINT` with its control endpoint), or stop it first"
            )
        return f"the speaker store {store} is locked by {who}; try again when it has finished"

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> StoreLock:
        return self if self._fd is not None else self.acquire()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def daemon_holding(directory: Path) -> Holder | None:
    """The daemon serving the store in ``directory``, or None when no ``speakerd run`` holds it."""
    path = Path(directory) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            return holder if holder is not None and holder.is_daemon else None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
