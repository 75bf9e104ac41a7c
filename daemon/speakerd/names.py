"""The one rule for a speaker's name, applied wherever a name comes in (store, control, CLI).

A name is shown in terminals, logs and other programs' UIs, so it must not carry characters that
change how the text around it is displayed: control characters (newlines, escapes), line and
paragraph separators, lone surrogates (not encodable as UTF-8), and the bidirectional controls
that can make ``Alice`` display as something else (the "Trojan Source" characters). Joiners that
scripts and emoji need (U+200C, U+200D) are fine.
"""

from __future__ import annotations

import re
import unicodedata

from .errors import SpeakerdError

MAX_NAME_CHARS = 200
SPEAKER_ID_RE = re.compile(r"^spk-[0-9a-f]{8}$")
BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_REFUSED_CATEGORIES = ("Cc", "Cs", "Zl", "Zp")


class BadName(SpeakerdError):
    """A speaker name that breaks the rule; the message names the offending character."""

    exit_code = 2


def _refused(c: str) -> bool:
    return c in BIDI_CONTROLS or unicodedata.category(c) in _REFUSED_CATEGORIES


def check_name(name: object, error: type[SpeakerdError] = BadName) -> str:
    """``name`` if it is a usable speaker name; otherwise ``error`` saying what to change."""
    if not isinstance(name, str) or not name.strip():
        raise error(f"speaker name {name!r} is empty")
    if name != name.strip():
        raise error(f"speaker name {name!r} has leading or trailing spaces")
    if len(name) > MAX_NAME_CHARS:
        raise error(f"speaker name is longer than {MAX_NAME_CHARS} characters")
    bad = next((c for c in name if _refused(c)), None)
    if bad is not None:
        kind = "a bidirectional control" if bad in BIDI_CONTROLS else "a control or separator"
        raise error(
            f"speaker name {name!r} contains {kind} character (U+{ord(bad):04X}); "
            "use letters, digits, spaces and punctuation only"
        )
    if SPEAKER_ID_RE.match(name):
        raise error(f"speaker name {name!r} looks like a speaker id; choose another name")
    return name
