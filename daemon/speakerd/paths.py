"""Per-platform default locations."""

from __future__ import annotations

import os
import sys
from pathlib import Path

APP = "speakerd"


def data_dir() -> Path:
    """~/Library/Application Support/speakerd on macOS, $XDG_DATA_HOME/speakerd elsewhere."""
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / APP
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "share") / APP


def runtime_dir() -> Path:
    """Where ipc sockets live: $XDG_RUNTIME_DIR/speakerd, else under the data dir."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return Path(xdg) / APP if xdg else data_dir() / "run"


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) as 0700: voiceprints are biometric data."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path
