"""Errors a user can act on; the CLI turns each into a clear message and an exit code."""

from __future__ import annotations


class SpeakerdError(Exception):
    """Base for errors that carry a message meant for the user."""

    exit_code = 1


class ConfigError(SpeakerdError):
    """A setting has a bad value. Names the key and the value; the daemon exits 2 before starting."""

    exit_code = 2

    def __init__(self, key: str, value: object, reason: str) -> None:
        super().__init__(f"config {key} = {value!r}: {reason}")
        self.key = key
        self.value = value


class AudioError(SpeakerdError):
    """Audio that cannot be read or decoded, or a device that cannot be opened. Names the file/device."""

    exit_code = 2


def check(condition: bool, key: str, value: object, reason: str) -> None:
    """Raise ConfigError unless ``condition``; used in settings ``__post_init__``."""
    if not condition:
        raise ConfigError(key, value, reason)
