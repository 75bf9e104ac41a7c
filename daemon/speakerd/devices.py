"""Input device listing and lookup, for ``speakerd devices`` and ``--source mic:NAME``.

sounddevice is imported lazily: importing it initialises PortAudio, which enumerates devices once,
and that must not happen merely because the package was imported. Functions take an optional device
list (the shape ``sounddevice.query_devices()`` returns) so they can be tested without hardware.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

from .errors import AudioError

log = logging.getLogger(__name__)

DeviceList = Sequence[Mapping[str, Any]]


def sounddevice() -> ModuleType:
    """The sounddevice module, with a clear message when PortAudio itself is missing."""
    try:
        import sounddevice as sd
    except OSError as e:  # sounddevice raises OSError when libportaudio cannot be loaded
        raise AudioError(f"cannot load PortAudio (install libportaudio2): {e}") from e
    return sd


def rescan_devices() -> None:
    """Re-initialise PortAudio so devices that appeared after import (e.g. a PulseAudio server
    started later, which is what makes ALSA's ``pulse`` PCM openable) are listed."""
    sd = sounddevice()
    sd._terminate()
    sd._initialize()


def list_input_devices(devices: DeviceList | None = None, default_index: int | None = None) -> list[dict[str, Any]]:
    """Devices that can record: index, name, channels, default_samplerate, is_default.

    Without ``devices`` the system is queried and the default input is PortAudio's.
    """
    if devices is None:
        sd = sounddevice()
        devices = sd.query_devices()
        default_index = _default_input_index(sd)
    out = []
    for i, dev in enumerate(devices):
        channels = int(dev.get("max_input_channels", 0))
        if channels <= 0:
            continue
        index = int(dev.get("index", i))
        out.append(
            {
                "index": index,
                "name": str(dev["name"]),
                "channels": channels,
                "default_samplerate": float(dev.get("default_samplerate", 0.0)),
                "is_default": index == default_index,
            }
        )
    return out


def format_devices(devices: Sequence[Mapping[str, Any]] | None = None) -> str:
    """One line per input device; ``*`` marks the default. For ``speakerd devices``."""
    devices = list_input_devices() if devices is None else devices
    if not devices:
        return "no input devices found"
    lines = []
    for d in devices:
        mark = "*" if d["is_default"] else " "
        lines.append(f"{mark} {d['index']:3d}  {d['name']}  ({d['channels']} ch, {d['default_samplerate']:.0f} Hz)")
    return "\n".join(lines)


def resolve_device(name_or_index: str | int, devices: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """The input device named by index, exact name or unique case-insensitive substring.

    Raises AudioError naming the request and listing the input devices when nothing (or more than
    one device, for a substring) matches.
    """
    devices = list_input_devices() if devices is None else list(devices)
    key = name_or_index
    if isinstance(key, str) and key.strip().isdigit():
        key = int(key.strip())
    if isinstance(key, int):
        found = [dict(d) for d in devices if d["index"] == key]
    else:
        wanted = key.casefold()
        found = [dict(d) for d in devices if d["name"].casefold() == wanted]
        if not found:
            found = [dict(d) for d in devices if wanted in d["name"].casefold()]
    if len(found) == 1:
        return found[0]
    available = format_devices(devices)
    if found:
        names = ", ".join(repr(d["name"]) for d in found)
        raise AudioError(f"input device {name_or_index!r} is ambiguous ({names}); input devices:\n{available}")
    raise AudioError(f"input device {name_or_index!r} not found; input devices:\n{available}")


def default_input_device(devices: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """The default input device; AudioError when the system has none."""
    devices = list_input_devices() if devices is None else list(devices)
    for d in devices:
        if d["is_default"]:
            return dict(d)
    raise AudioError(f"no default input device; input devices:\n{format_devices(devices)}")


def _default_input_index(sd: ModuleType) -> int | None:
    try:
        index = sd.default.device[0]
        if index is None or int(index) < 0:
            index = sd.query_devices(kind="input")["index"]
        return int(index)
    except (sd.PortAudioError, ValueError, TypeError, KeyError):
        return None
