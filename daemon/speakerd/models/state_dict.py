"""Strict checkpoint loading whose errors name every key that does not fit.

Shared by every model family: a checkpoint from the wrong model, version or export must fail
loudly and say what is missing, extra or the wrong shape, never load half its weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import SpeakerdError

MAX_NAMED_KEYS = 12
"""Keys named per kind of problem; a wholly different model would otherwise print hundreds."""


class CheckpointError(SpeakerdError):
    """A checkpoint cannot be read or does not match the model it claims to be."""

    exit_code = 2


def name_keys(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_NAMED_KEYS])
    more = len(keys) - MAX_NAMED_KEYS
    return f"{shown} (+{more} more)" if more > 0 else shown


def state_dict_problems(expected: Mapping[str, Any], state: Mapping[str, Any]) -> list[str]:
    """Missing, unexpected and wrongly shaped keys of ``state`` against ``expected``, in words."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mis_shaped = sorted(
        f"{k} {tuple(getattr(state[k], 'shape', ()))} (model {tuple(expected[k].shape)})"
        for k in set(expected) & set(state)
        if tuple(getattr(state[k], "shape", ())) != tuple(expected[k].shape)
    )
    problems = []
    if missing:
        problems.append(f"missing keys: {name_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {name_keys(unexpected)}")
    if mis_shaped:
        problems.append(f"wrong shapes: {name_keys(mis_shaped)}")
    return problems


def load_strict(model: Any, state: Mapping[str, Any], *, what: str) -> None:
    """``model.load_state_dict(strict=True)``, after refusing, by name, any key that does not fit."""
    problems = state_dict_problems(model.state_dict(), state)
    if problems:
        raise CheckpointError(f"{what}: " + "; ".join(problems))
    model.load_state_dict(dict(state), strict=True)
