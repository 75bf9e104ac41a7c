"""Multi-condition enrollment: a voice enrolled from clean files, with room versions of them, scores
much higher when heard across a room through a table microphone than one enrolled from the files alone;
the rooms come from the model bundle, so enrollment needs no room simulator."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speakerd.audio import SAMPLE_RATE
from speakerd.enroll import add_room_versions, embed_windows, file_windows, prepare_enrollment
from speakerd.evaluation.conversation import librispeech_speakers
from speakerd.rooms import MultiConditionSettings, RoomError, RoomSettings, active_mask, build_room, colored_noise, convolve, mix_at_snr
from speakerd.settings import Settings

pytest.importorskip("pyroomacoustics", reason="the room simulation needs pyroomacoustics (speakerd[eval])")

SPEAKER = "3080"
VERSIONS = 3


@pytest.fixture(scope="module")
def model(default_model: Path):
    from speakerd.bundle import resolve_bundle
    from speakerd.embedding import backend_for

    settings = Settings()
    bundle = resolve_bundle(str(default_model))
    backend = backend_for(bundle, settings.embedding, settings.windows)
    yield settings, bundle, backend
    backend.close()


def _centroid(embeddings: np.ndarray) -> np.ndarray:
    c = embeddings.mean(axis=0)
    return c / np.linalg.norm(c)


def _through_a_room(clip: Path, tmp: Path, seed: int) -> Path:
    """The clip from 1.5-2.5 m across a room of RT60 0.45 s, pink noise at 18 dB: the eval's room."""
    audio, _ = sf.read(str(clip), dtype="float32")
    rng = np.random.default_rng(seed)
    room = build_room(RoomSettings(rt60_s=(0.45, 0.45)), rng)
    wet = convolve(audio, room.response(room.place(rng, (1.5, 2.5))))
    mixed, _ = mix_at_snr(wet, colored_noise("pink", len(wet), rng), 18.0, active_mask(audio))
    path = tmp / f"room-{seed}.wav"
    sf.write(str(path), mixed, SAMPLE_RATE, subtype="FLOAT")
    return path


def _scores(path: Path, voiceprint: np.ndarray, settings: Settings, bundle, backend) -> float:  # noqa: ANN001
    windows, _ = file_windows(path, settings, bundle.features)
    embs = embed_windows(windows, backend.embed)
    embs /= np.linalg.norm(embs, axis=1, keepdims=True)
    return float(np.mean(embs @ voiceprint))


def test_room_versions_lift_the_score_across_a_room(model, librispeech: Path, tmp_path: Path) -> None:
    settings, bundle, backend = model
    clips = librispeech_speakers(librispeech)[SPEAKER]
    report = prepare_enrollment(SPEAKER, clips[:2], settings, bundle.features, backend.embed)
    multi = add_room_versions(report, settings, bundle.features, backend.embed, MultiConditionSettings(versions=VERSIONS))
    assert [f.path for f in multi.files] == [f.path for f in report.files]
    assert np.array_equal(multi.embeddings_matrix(), report.embeddings_matrix())  # the recordings' voiceprint as it was
    assert len(multi.rooms_matrix()) > VERSIONS * 0.8 * report.num_embeddings  # every version gave windows
    clean, rooms = _centroid(report.embeddings_matrix()), _centroid(multi.rooms_matrix())
    for i, clip in enumerate(clips[5:7]):
        heard = _through_a_room(clip, tmp_path, seed=i)
        before = _scores(heard, clean, settings, bundle, backend)
        after = _scores(heard, rooms, settings, bundle, backend)
        # the room versions' voiceprint alone: from far below the 0.70 threshold to about it
        assert after - before > 0.10, (clip.name, before, after)
        assert after > 0.62


def test_no_versions_is_the_enrollment_unchanged(model, librispeech: Path) -> None:
    settings, bundle, backend = model
    clips = librispeech_speakers(librispeech)[SPEAKER][:2]
    report = prepare_enrollment(SPEAKER, clips, settings, bundle.features, backend.embed)
    assert add_room_versions(report, settings, bundle.features, backend.embed, MultiConditionSettings(versions=0)) is report


def test_missing_pyroomacoustics_says_what_to_install(model, librispeech: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings, bundle, backend = model
    clips = librispeech_speakers(librispeech)[SPEAKER][:2]
    report = prepare_enrollment(SPEAKER, clips, settings, bundle.features, backend.embed)
    monkeypatch.setitem(sys.modules, "pyroomacoustics", None)  # as if not installed
    with pytest.raises(RoomError, match=r"pip install 'speakerd\[rooms\]'"):
        add_room_versions(report, settings, bundle.features, backend.embed, MultiConditionSettings(versions=2))


# -- the model bundle's room responses: enrollment through rooms with no room simulator ----------------


@pytest.fixture(scope="module")
def responses():
    from speakerd.room_responses import build_responses

    return build_responses(count=VERSIONS, seed=7)


def test_the_bundles_room_responses_need_no_room_simulator(model, responses, librispeech: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    settings, bundle, backend = model
    clips = librispeech_speakers(librispeech)[SPEAKER]
    report = prepare_enrollment(SPEAKER, clips[:2], settings, bundle.features, backend.embed)
    heard = [_through_a_room(clip, tmp_path, seed=10 + i) for i, clip in enumerate(clips[5:7])]  # before it goes
    monkeypatch.setitem(sys.modules, "pyroomacoustics", None)  # as on a Mac with the daemon's dependencies only
    multi = add_room_versions(report, settings, bundle.features, backend.embed, MultiConditionSettings(versions=VERSIONS), responses)
    assert len(multi.rooms_matrix()) > VERSIONS * 0.8 * report.num_embeddings
    clean, rooms = _centroid(report.embeddings_matrix()), _centroid(multi.rooms_matrix())
    for path in heard:
        before = _scores(path, clean, settings, bundle, backend)
        after = _scores(path, rooms, settings, bundle, backend)
        assert after - before > 0.10, (path.name, before, after)


def test_room_responses_are_whole_rooms_and_survive_a_save(responses, tmp_path: Path) -> None:
    from speakerd.room_responses import load_responses, trimmed

    assert len(responses) == VERSIONS
    for response, rt60 in zip(responses.responses, responses.rt60_s, strict=True):
        assert 0.25 <= rt60 <= 0.75
        # the tail cut keeps the decay an RT60 needs (60 dB) and no more than a second of it
        assert 0.2 * rt60 * SAMPLE_RATE < len(response) <= 1.5 * SAMPLE_RATE
        assert np.sum(response.astype(np.float64) ** 2) > 0
    responses.save(tmp_path / "rooms.npz")
    loaded = load_responses(tmp_path / "rooms.npz")
    assert all(np.array_equal(a, b) for a, b in zip(loaded.responses, responses.responses, strict=True))
    decay = np.exp(-np.arange(16000) / 800.0)  # energy exp(-n / 400): what remains is 60 dB down at n = 5,526
    cut = trimmed(decay)
    kept = np.sum(cut.astype(np.float64) ** 2) / np.sum(decay ** 2)
    assert 1 - 1e-6 <= kept <= 1.0 and 5500 <= len(cut) <= 5560


def test_damaged_room_responses_are_refused(tmp_path: Path) -> None:
    from speakerd.room_responses import load_responses

    path = tmp_path / "rooms.npz"
    np.savez(path, samples=np.zeros(10, dtype=np.float32), lengths=np.array([4, 4]), rt60_s=np.array([0.3, 0.4]))
    with pytest.raises(ValueError, match="does not hold room responses"):
        load_responses(path)


def test_a_bundle_without_responses_enrolls_clean_unless_rooms_were_asked_for(default_model: Path, tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch,
                                                                               caplog: pytest.LogCaptureFixture) -> None:
    import dataclasses

    from speakerd.bundle import resolve_bundle
    from speakerd.enroll import enrollment_rooms

    bundle = dataclasses.replace(resolve_bundle(str(default_model)), path=tmp_path)  # no rooms.npz there
    multi = MultiConditionSettings(versions=2)
    assert enrollment_rooms(bundle, multi, asked=False) == (multi, None)  # pyroomacoustics simulates them
    monkeypatch.setitem(sys.modules, "pyroomacoustics", None)
    with caplog.at_level("WARNING"):
        used, drawn = enrollment_rooms(bundle, multi, asked=False)
    assert (used.versions, drawn) == (0, None)
    assert "speakerd models build" in caplog.text
    with pytest.raises(RoomError, match=r"pip install 'speakerd\[rooms\]'"):
        enrollment_rooms(bundle, multi, asked=True)
    assert enrollment_rooms(resolve_bundle(str(default_model)), multi, asked=True)[1] is not None  # the built bundle has them
