"""Reading the files a user hands speakerd: m4a as the README shows, and messages that say what is
wrong (no such file, not audio, too little speech) and what would work (issue 18)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from daemon_harness import speakerd
from speakerd.audiofile import FFmpegFile, open_audio_file
from speakerd.errors import AudioError, ConfigError
from speakerd.settings import load_settings
from speakerd.sources import FileSource

av = pytest.importorskip("av", reason="PyAV reads m4a/AAC (a dependency of speakerd)")

CLIPS = ("test-other/1688/1688-142285-0003.flac", "test-other/1688/1688-142285-0005.flac")
SR = 16000
AAC_DELAY_MAX_S = 0.15
"""An AAC encoder's priming and padding: the decoded m4a may be this much longer than its source."""


def write_m4a(path: Path, audio: np.ndarray, rate: int = SR) -> Path:
    """An AAC-in-MP4 file, as phones and Macs record them, made with ffmpeg's own AAC encoder."""
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=rate, layout="mono")
        for start in range(0, len(audio), 1024):
            frame = av.AudioFrame.from_ndarray(audio[None, start : start + 1024].astype(np.float32), format="fltp", layout="mono")
            frame.sample_rate = rate
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def read_all(source: FileSource) -> np.ndarray:
    with source:
        parts = []
        while not source.finished:
            chunk = source.read(1.0)
            if chunk is not None:
                parts.append(chunk.samples)
    return np.concatenate(parts)


def test_an_m4a_is_read_through_ffmpeg_and_matches_its_source(librispeech: Path, tmp_path: Path) -> None:
    original, rate = sf.read(str(librispeech / CLIPS[0]), dtype="float32")
    assert rate == SR
    m4a = write_m4a(tmp_path / "memo.m4a", original)
    with pytest.raises(sf.LibsndfileError):
        sf.SoundFile(str(m4a))  # this libsndfile has no AAC: the fallback is what reads it
    opened = open_audio_file(m4a)
    assert isinstance(opened, FFmpegFile) and opened.samplerate == SR and opened.channels == 1
    opened.close()
    decoded = read_all(FileSource(m4a, realtime=False))
    assert len(original) <= len(decoded) <= len(original) + AAC_DELAY_MAX_S * SR
    # the same sound: the best alignment within the encoder delay correlates almost perfectly
    shift = max(range(int(AAC_DELAY_MAX_S * SR)), key=lambda k: float(decoded[k : k + SR] @ original[:SR]))
    aligned = decoded[shift : shift + len(original)]
    assert np.corrcoef(aligned, original[: len(aligned)])[0, 1] > 0.95


def test_block_reads_cover_the_file_exactly_once(tmp_path: Path) -> None:
    tone = (0.3 * np.sin(2 * np.pi * 220 * np.arange(2 * SR) / SR)).astype(np.float32)
    m4a = write_m4a(tmp_path / "tone.m4a", tone)
    whole = FFmpegFile(m4a, av)
    everything = whole.read(10 * SR)
    whole.close()
    blocks = FFmpegFile(m4a, av)
    pieces = []
    while len(piece := blocks.read(1600)) == 1600:
        pieces.append(piece)
    pieces.append(piece)
    blocks.close()
    assert everything.shape[1] == 1 and np.array_equal(np.concatenate(pieces), everything)


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda d: d / "missing.wav", r"cannot read audio file .*missing\.wav: no such file$"),
        (lambda d: d, r"cannot read audio file .*: it is a directory, not an audio file$"),
    ],
)
def test_a_path_that_is_no_audio_file_says_so_in_plain_words(tmp_path: Path, make, says: str) -> None:  # noqa: ANN001
    with pytest.raises(AudioError, match=says) as info:
        FileSource(make(tmp_path), realtime=False)
    assert "System error" not in str(info.value)


def test_an_unreadable_format_lists_the_formats_that_work(tmp_path: Path) -> None:
    junk = tmp_path / "notes.txt"
    junk.write_text("not audio at all\n" * 50)
    with pytest.raises(AudioError) as info:
        FileSource(junk, realtime=False)
    message = str(info.value)
    assert message.startswith(f"cannot read audio file {junk}: not audio in a format speakerd reads")
    for fmt in ("WAV", "FLAC", "OGG", "MP3", "M4A/AAC"):
        assert fmt in message


# -- the CLI, as the README uses it ---------------------------------------------------------------


def test_the_readme_enrolls_from_m4a(librispeech: Path, default_model: Path, tmp_path: Path) -> None:
    files = []
    for i, clip in enumerate(CLIPS):
        audio, _ = sf.read(str(librispeech / clip), dtype="float32")
        files.append(str(write_m4a(tmp_path / f"alice-{i}.m4a", audio)))
    proc = speakerd("enroll", "Alice", *files, "--store", str(tmp_path / "store"))
    assert proc.stdout.startswith("enrolled Alice (")
    assert all(f"{f}:" in proc.stdout for f in files)


def test_a_missing_file_is_exit_2_no_such_file(tmp_path: Path, default_model: Path) -> None:
    proc = speakerd("run", "--source", f"file:{tmp_path / 'meeting.wav'}", "--store", str(tmp_path / "s"),
                    "--pub", "tcp://127.0.0.1:*", check=False, timeout=120)
    assert proc.returncode == 2
    assert f"cannot read audio file {tmp_path / 'meeting.wav'}: no such file" in proc.stderr


def test_a_clip_with_too_little_speech_says_how_much_was_found_and_needed(librispeech: Path, default_model: Path,
                                                                           tmp_path: Path) -> None:
    audio, _ = sf.read(str(librispeech / CLIPS[0]), dtype="float32")
    short = tmp_path / "short.wav"
    sf.write(short, audio[SR : 2 * SR], SR)  # 1 s of continuous speech: less than 1 s is voiced
    proc = speakerd("enroll", "Bob", str(short), "--store", str(tmp_path / "store"), check=False, timeout=120)
    assert proc.returncode == 2
    found = re.search(r"only (\d+\.\d\d) s of speech found; each file needs at least (\d+\.\d\d) s", proc.stderr)
    assert found, proc.stderr
    assert float(found[1]) < float(found[2]) == 1.0  # the figures show why it was refused


# -- settings of the wrong kind -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "key", "value", "says"),
    [
        ("vad", "aggressiveness", "high", "expected an integer (must be 0, 1, 2 or 3)"),
        ("daemon", "realtime", "yes", "expected true or false"),
        ("windows", "hop_s", "half", "expected a number (must be within 0.1 s and length_s)"),
        ("embedding", "backend", 3, "expected a string (must be auto, onnx or coreml)"),
        ("publish", "events_out", 1, 'expected a string, or "" for unset'),
        ("audio", "device_rate", 44.1, 'expected an integer, or "" for unset (must be unset or in [4000, 768000] Hz)'),
    ],
)
def test_a_setting_of_the_wrong_kind_names_the_kind_and_its_range(section: str, key: str, value: object, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, {section: {key: value}})
    assert str(info.value) == f"config {section}.{key} = {value!r}: {says}"
    assert "<class" not in str(info.value)
