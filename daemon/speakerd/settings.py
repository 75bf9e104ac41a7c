"""All settings, parsed once from TOML and the command line into frozen per-subsystem dataclasses.

Each subsystem owns its settings dataclass (and its validation); this module only composes them,
maps TOML sections onto them and reports bad keys and values by name before anything starts.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .control import ControlSettings
from .decisions.clustering import ProvisionalSettings
from .decisions.tracker import TrackerSettings
from .decisions.values import MOVED, DecisionOverrides
from .embedding.worker import EmbeddingSettings
from .errors import ConfigError, check
from .matcher import MatchSettings
from .publisher import PublishSettings
from .rooms import MultiConditionSettings
from .sources import SourceSettings
from .vad import VadSettings
from .windows import WindowSettings


@dataclass(frozen=True)
class DaemonSettings:
    source: str = "mic"
    """mic, mic:NAME_OR_INDEX or file:PATH."""
    realtime: bool = True
    """Pace file sources in real time (live sources always are)."""
    store: str | None = None
    """Speaker store directory; empty means the platform default."""
    status_interval_s: float = 5.0
    """Seconds of audio between status events."""
    log_level: str = "INFO"
    curve_keys: str | None = None
    """Directory of CURVE keys (`speakerd keys generate`): when set, the publish and control sockets
    encrypt and admit only clients whose public keys are in its authorized/ folder. Required for
    endpoints other machines can reach."""

    def __post_init__(self) -> None:
        check(0.5 <= self.status_interval_s <= 3600, "daemon.status_interval_s", self.status_interval_s, "must be within 0.5 to 3600 s")
        check(
            self.log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"),
            "daemon.log_level",
            self.log_level,
            "must be DEBUG, INFO, WARNING or ERROR",
        )


@dataclass(frozen=True)
class Settings:
    daemon: DaemonSettings = field(default_factory=DaemonSettings)
    audio: SourceSettings = field(default_factory=SourceSettings)
    vad: VadSettings = field(default_factory=VadSettings)
    windows: WindowSettings = field(default_factory=WindowSettings)
    embedding: EmbeddingSettings = field(default_factory=EmbeddingSettings)
    matching: MatchSettings = field(default_factory=MatchSettings)
    tracker: TrackerSettings = field(default_factory=TrackerSettings)
    decision: DecisionOverrides = field(default_factory=DecisionOverrides)
    """Overrides of the model bundle's decision values (each unset takes the bundle's)."""
    provisional: ProvisionalSettings = field(default_factory=ProvisionalSettings)
    publish: PublishSettings = field(default_factory=PublishSettings)
    control: ControlSettings = field(default_factory=ControlSettings)
    enroll_rooms: MultiConditionSettings = field(default_factory=MultiConditionSettings)


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Settings)}  # type: ignore[misc]


def _accepts(value: Any, annotation: Any) -> bool:
    """Whether a TOML value fits a field annotation (ints are accepted where floats are)."""
    if annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


KIND_WORDS: dict[Any, str] = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
PROBES: dict[Any, tuple[Any, ...]] = {int: (-(10**9), 10**9), float: (-1e12, 1e12), str: ("\x00",)}
"""Values of the right kind that no setting accepts: what a setting says of them is its range or choices."""


def _kinds(annotation: Any) -> list[Any]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [k for arg in typing.get_args(annotation) for k in _kinds(arg)]
    return [annotation]


def describe_kind(annotation: Any) -> str:
    """A setting's type in the words of a TOML file: 'an integer', 'a string, or "" for unset'."""
    kinds = _kinds(annotation)
    words = " or ".join(KIND_WORDS.get(k, getattr(k, "__name__", str(k))) for k in kinds if k is not type(None))
    return words + (', or "" for unset' if type(None) in kinds else "")


def _constraint(key: str, base: Any, field_name: str, annotation: Any) -> str:
    """What the setting itself requires of a value of its kind (e.g. "must be 0, 1, 2 or 3"), found by
    offering it a value of that kind that no setting accepts; "" when it takes any."""
    for kind in _kinds(annotation):
        for probe in PROBES.get(kind, ()):
            try:
                dataclasses.replace(base, **{field_name: probe})
            except ConfigError as exc:
                prefix = f"config {key} = {probe!r}: "
                if exc.key == key and str(exc).startswith(prefix):
                    return str(exc)[len(prefix):]
            except Exception:  # noqa: BLE001 - a probe that breaks a check says nothing
                continue
    return ""


def _section(name: str, cls: type, values: dict[str, Any], base: Any) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{name}.{key}", value, f"unknown key; {name} takes {', '.join(sorted(known))}")
        if not _accepts(value, hints[key]):
            need = _constraint(f"{name}.{key}", base, key, hints[key])
            raise ConfigError(f"{name}.{key}", value, f"expected {describe_kind(hints[key])}" + (f" ({need})" if need else ""))
    try:
        return dataclasses.replace(base, **values)
    except TypeError as exc:
        raise ConfigError(name, values, str(exc)) from None


def load_settings(path: Path | None = None, overrides: dict[str, dict[str, Any]] | None = None) -> Settings:
    """Defaults, then the TOML file, then command-line overrides; the empty string means "unset"."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError("--config", str(path), "no such file") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("--config", str(path), f"not valid TOML: {exc}") from None
    for section, values in (overrides or {}).items():
        if not isinstance(data.setdefault(section, {}), dict):
            raise ConfigError(section, data[section], "must be a table")
        data[section].update(values)
    settings = Settings()
    parts: dict[str, Any] = {}
    for name, values in data.items():
        if name not in SECTIONS:
            raise ConfigError(name, values, f"unknown section; sections are {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(name, values, "must be a table")
        for key in values:
            if (name, key) in MOVED:
                raise ConfigError(
                    f"{name}.{key}", values[key], f"is now the model's decision value decision.{MOVED[name, key]}: set it "
                    "under [decision], or calibrate the model (`speakerd calibrate --write-bundle`, docs/calibration.md)"
                )
        cleaned = {k: (None if v == "" else v) for k, v in values.items()}
        parts[name] = _section(name, SECTIONS[name], cleaned, getattr(settings, name))
    return dataclasses.replace(settings, **parts)


def default_config_path() -> Path:
    return Path(__file__).resolve().parents[2] / "config" / "default.toml"
