"""load_settings and config/default.toml: the documented file equals the code defaults; errors name the key."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

from speakerd.errors import ConfigError
from speakerd.settings import SECTIONS, Settings, default_config_path, load_settings

DEFAULT_TOML = default_config_path()


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "speakerd.toml"
    path.write_text(text)
    return path


def test_default_toml_is_the_code_defaults() -> None:
    assert DEFAULT_TOML == Path(__file__).resolve().parents[1] / "config" / "default.toml"
    assert load_settings(DEFAULT_TOML) == Settings()
    assert load_settings() == Settings()


def test_every_setting_is_in_default_toml_with_a_comment_above_it() -> None:
    lines = DEFAULT_TOML.read_text().splitlines()
    documented: dict[str, set[str]] = {}
    section = None
    for i, line in enumerate(lines):
        if m := re.fullmatch(r"\[(\w+)\]", line):
            section = m.group(1)
            documented[section] = set()
        elif m := re.match(r"(\w+) = ", line):
            assert section is not None, f"line {i + 1}: key outside a section"
            assert lines[i - 1].startswith("# "), f"{section}.{m.group(1)} has no comment line above it"
            documented[section].add(m.group(1))
    expected = {name: {f.name for f in dataclasses.fields(cls)} for name, cls in SECTIONS.items()}
    missing = sorted(f"{s}.{k}" for s, keys in expected.items() for k in keys - documented.get(s, set()))
    extra = sorted(f"{s}.{k}" for s, keys in documented.items() for k in keys - expected.get(s, set()))
    assert (missing, extra) == ([], [])
    assert list(documented) == list(SECTIONS)  # same sections, same order as Settings


def test_default_toml_shows_each_default_value() -> None:
    data = tomllib.loads(DEFAULT_TOML.read_text())
    defaults = Settings()
    for section, values in data.items():
        for key, value in values.items():
            actual = getattr(getattr(defaults, section), key)
            assert (None if value == "" else value) == actual, f"{section}.{key}"


@pytest.mark.parametrize(
    ("text", "key", "value", "reason"),
    [
        ("[sound]\nrate = 1\n", "sound", {"rate": 1}, "unknown section"),
        ("[windows]\nlenght_s = 2.0\n", "windows.lenght_s", 2.0, "unknown key; windows takes first_length_s, hop_s, length_s, min_speech"),
        ("[windows]\nlength_s = \"long\"\n", "windows.length_s", "long", "expected"),
        ("[embedding]\nthreads = true\n", "embedding.threads", True, "expected"),
        ("[embedding]\nthreads = 1.5\n", "embedding.threads", 1.5, "expected"),
        ("[daemon]\nrealtime = 1\n", "daemon.realtime", 1, "expected"),
        ("[windows]\nlength_s = 20.0\n", "windows.length_s", 20.0, "must be within 0.5 to 10 s"),
        ("[tracker]\nconfirm_windows = 0\n", "tracker.confirm_windows", 0, "must be within 1 to 10"),
        ("[vad]\npadding_ms = 500\n", "vad.padding_ms", 500, "end_silence_ms"),
        ("[matching]\nscore = \"mean\"\n", "matching.score", "mean", "must be one of"),
        ("windows = 3\n", "windows", 3, "must be a table"),
    ],
)
def test_errors_name_the_key_and_the_value(tmp_path: Path, text: str, key: str, value: object, reason: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(write(tmp_path, text))
    assert (err.value.key, err.value.value) == (key, value)
    assert str(err.value).startswith(f"config {key} = {value!r}: ")
    assert reason in str(err.value)
    assert err.value.exit_code == 2


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file") as err:
        load_settings(tmp_path / "absent.toml")
    assert err.value.key == "--config"
    with pytest.raises(ConfigError, match="not valid TOML") as err:
        load_settings(write(tmp_path, "[windows\nhop_s = 0.5\n"))
    assert err.value.key == "--config"


def test_empty_string_means_unset(tmp_path: Path) -> None:
    path = write(tmp_path, '[daemon]\nstore = "/tmp/x"\n[audio]\ndevice = 3\ndevice_rate = 48000\n')
    s = load_settings(path)
    assert (s.daemon.store, s.audio.device, s.audio.device_rate) == ("/tmp/x", 3, 48000)
    s = load_settings(path, {"daemon": {"store": ""}, "audio": {"device": "", "device_rate": ""}})
    assert (s.daemon.store, s.audio.device, s.audio.device_rate) == (None, None, None)
    with pytest.raises(ConfigError) as err:  # unset is not a value for a key that needs one
        load_settings(write(tmp_path, '[daemon]\nsource = ""\n'))
    assert err.value.key == "daemon.source"


def test_overrides_beat_the_file_and_the_rest_keeps_its_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "[windows]\nhop_s = 0.25\nlength_s = 2\n[tracker]\nconfirm_windows = 3\n")
    s = load_settings(path, {"windows": {"hop_s": 0.5}, "embedding": {"threads": 2}})
    assert s.windows == dataclasses.replace(Settings().windows, hop_s=0.5, length_s=2)
    assert s.tracker.confirm_windows == 3
    assert s.embedding.threads == 2
    assert (s.daemon, s.audio, s.vad, s.matching, s.publish) == (
        Settings().daemon, Settings().audio, Settings().vad, Settings().matching, Settings().publish
    )
    assert load_settings(None, {"windows": {"hop_s": 0.25}}).windows.hop_s == 0.25
    with pytest.raises(ConfigError) as err:  # overrides are validated like the file
        load_settings(path, {"windows": {"hop_s": 5.0}})
    assert err.value.key == "windows.hop_s"


def test_override_of_a_section_the_file_broke_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(write(tmp_path, "windows = 3\n"), {"windows": {"hop_s": 0.5}})
    assert err.value.key == "windows"


def test_settings_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings().windows.hop_s = 1.0  # type: ignore[misc]
