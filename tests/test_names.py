"""One rule for speaker names, wherever a name comes in: the store, the control socket, the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from daemon_harness import speakerd

from speakerd.names import BadName, check_name
from speakerd.store import SpeakerStore, StoreError


@pytest.mark.parametrize(
    "name",
    ["Al\u202eecila", "Al\u2066ice", "\u200fEve", "Bob\u061c", "Al\nice", "Al\x1bice", "Al\x85ice", "Al\u2028ice", "Al\ud800ice"],
)
def test_control_bidi_separator_and_surrogate_characters_are_refused(name: str) -> None:
    with pytest.raises(BadName, match=r"U\+[0-9A-F]{4}"):
        check_name(name)


@pytest.mark.parametrize("name", ["Alice", "Zoë Ñúñez", "محمد", "ज़ोया", "می\u200cخواهم", "👩\u200d💻 Dev", "O'Brien-Smith"])
def test_names_in_any_script_with_their_joiners_are_fine(name: str) -> None:
    assert check_name(name) == name


def test_the_store_applies_the_same_rule(tmp_path: Path) -> None:
    with SpeakerStore(tmp_path / "s", fingerprint="m", dim=4) as store:
        with pytest.raises(StoreError, match="bidirectional control"):
            store.enroll("Al\u202eice", np.ones((1, 4), np.float32), source="test")
        alice = store.enroll("Alice", np.ones((1, 4), np.float32), source="test")
        with pytest.raises(StoreError, match="bidirectional control"):
            store.rename(alice.id, "Ali\u2067ce")
        assert [s.name for s in store.speakers()] == ["Alice"]


def test_speakerd_enroll_refuses_the_name_before_reading_any_audio(tmp_path: Path) -> None:
    proc = speakerd("enroll", "Al\u202eice", str(tmp_path / "missing.wav"), "--store", str(tmp_path / "s"), check=False)
    assert proc.returncode == 2
    assert "U+202E" in proc.stderr and "missing.wav" not in proc.stderr
    assert not (tmp_path / "s").exists()
