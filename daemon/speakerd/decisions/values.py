"""The model's decision values: every cosine and margin bar the decision layer uses, in one place.

A cosine threshold is a property of the embedding model (docs/calibration.md), so these values live
in the model bundle's manifest (its ``decision`` section, written by ``speakerd calibrate
--write-bundle``); the config's ``[decision]`` section overrides any of them. Counts and durations
that do not depend on the model's cosine scale (``tracker.confirm_windows``, ``provisional.
min_speech_s``, ...) stay ordinary settings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from ..errors import SpeakerdError, check

if TYPE_CHECKING:
    from ..bundle import ModelBundle

BUNDLE = "bundle"
CONFIG = "config"


class DecisionValuesMissing(SpeakerdError):
    """A model bundle without calibrated decision values, and a config that does not give them."""

    exit_code = 2


@dataclass(frozen=True)
class DecisionValues:
    """Calibrated bars, all on the model's cosine scale. Values in brackets: ge2e-resemblyzer's."""

    threshold: float
    """A window's speaker score at or above this names that speaker (0.70). Also the bar for a
    region's last probes to show another enrolled voice's first words (an enrolled voice absent from
    a tail probe scored at most 0.69 over 434 cases, docs/calibration.md)."""
    relaxed_threshold: float
    """Below ``threshold`` but at least this, a window is still named when it leads every other
    enrolled speaker by ``relaxed_margin`` (0.64; 1.0 turns the rule off; needs 3+ enrolled)."""
    relaxed_margin: float
    """See ``relaxed_threshold`` (0.14: never-enrolled windows' margin 99th percentile 0.13)."""
    uncertain_band: float
    """A score within this of ``threshold`` (either side) is too close to call: such a window never
    changes the speaker on its own (0.005)."""
    uncertain_margin: float
    """A named window leading the runner-up by less than this is too close to call too (0.01)."""
    decisive_margin: float
    """A named window this far ahead of the runner-up changes the speaker at once, and a probe the
    matcher names needs it to announce a tentative change (0.05)."""
    tentative_score: float
    """A weak window (a probe, or one the matcher left unnamed) whose nearest speaker scores at
    least this ... (0.60)"""
    tentative_margin: float
    """... and leads the runner-up by this much is evidence for a tentative change. The same lead
    places a change point, makes a provisional voice's return count, and lets an enrolled voice
    interrupt an unnamed one (0.08)."""
    lead_in_score: float
    """Weak windows just before a change, nearest the new enrolled voice and scoring at least this,
    count for it (0.55)."""
    departure_drop: float
    """A probe near no enrolled voice that falls this far below the current enrolled speaker's own
    level is evidence that a voice nobody enrolled took over (0.18)."""
    join_threshold: float
    """Cosine between an unnamed window and a group's centroid at which the window joins the group
    (0.72)."""
    merge_threshold: float
    """Centroid cosine at which two provisional speakers are taken for one voice (0.82)."""
    fold_threshold: float
    """Enrolled score of a group's centroid at which the group is that enrolled speaker (0.78)."""
    cohort_top_n: float = 0.0
    """Best background-cohort cosines whose mean is a window's (or an enrollment embedding's)
    channel level (20); 0 scores without the cohort (``decisions.cohort``)."""
    cohort_gain: float = 0.0
    """A window whose level lies under the enrolled voices' enrollment level has its scores raised
    by this times the difference: the channel's pull, taken back (2.0; 2.3 named 8-10 points more of
    the enrolled speech across a room but 2-7 points more never-enrolled speech, eval seeds 0-1)."""
    cohort_clean_level: float = 0.0
    """A clean session's cohort level (0.585, the mean over eval's clean windows): how far a
    session's level lies under it says how much room there is (``room_join_lift``)."""
    room_join_lift: float = 0.0
    """Open-set clustering's ``join_threshold`` and ``merge_threshold`` rise by this times how far
    the session's cohort level lies under ``cohort_clean_level``: one room makes different voices
    more alike (0.4: +0.03 at RT60 0.45 s, 18 dB; 0: off)."""
    room_score_penalty: float = 0.0
    """Scores fall by this times how far the higher of the window's and the enrolled voices' cohort
    levels lies under ``cohort_clean_level``: a window and voiceprints that share one room's
    colouring score high whoever speaks (1.33: -0.10 at RT60 0.45 s, 18 dB; 0: off). It puts a
    never-enrolled voice's windows at about the same place on the scale in every channel (offline,
    eval seed 0, gain 2.3, levels of single windows: 3 % of them reach 0.70 clean and 0.72 in a room
    against clean voiceprints and against voiceprints made there; gain 2.0 lowers the middle one)."""
    room_version_penalty: float = 0.0
    """A voice's room versions (multi-condition enrollment) score this much less than its clean
    voiceprint: voices nobody enrolled, heard through a room, come nearer to voiceprints made through
    rooms too (0.065; eval's room, seeds 0 / 1: 0 named 43 % of never-enrolled speech (seed 0),
    0.05 named 3.7 / 16.8 %, 0.065 3.0 / 4.7 %, 0.08 3.1 / 2.1 %, with 84 / 86, 77 / 81 and 73 / 73 %
    of enrolled speech named in the enrolled meetings; 0: counted as they are)."""
    adapt_windows: float = 0.0
    """In-session adaptation: a voice's session voiceprint holds its latest this many confidently
    named windows (30; 0: off; ``decisions.adaptation``)."""
    adapt_margin: float = 0.0
    """A window refines a session voiceprint when its enrolled score clears ``threshold`` and leads
    the runner-up by this (0.05)."""
    adapt_penalty: float = 0.0
    """A session voiceprint's cosine counts this much less than an enrolled one's (0.05)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            check_value(f.name, getattr(self, f.name))

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def required(cls) -> tuple[str, ...]:
        """Values a model must give; the rest (``OPTIONAL``) default to off."""
        return tuple(n for n in cls.names() if n not in OPTIONAL)

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


MARGINS = frozenset({"relaxed_margin", "uncertain_band", "uncertain_margin", "decisive_margin", "tentative_margin", "departure_drop",
                     "room_version_penalty", "adapt_margin", "adapt_penalty"})
"""Values that are differences of cosines (within 0 to 2); the rest are cosines (within -1 to 1)."""
WITHIN = {"cohort_top_n": 1000.0, "cohort_gain": 10.0, "room_join_lift": 10.0, "room_score_penalty": 10.0, "adapt_windows": 1000.0}
"""Values that are neither cosines nor margins: a count and a factor (within 0 and the number given)."""
OPTIONAL = frozenset({"cohort_top_n", "cohort_gain", "cohort_clean_level", "room_join_lift", "room_score_penalty",
                      "room_version_penalty", "adapt_windows", "adapt_margin", "adapt_penalty"})
"""Values a model may leave out: cohort compensation and in-session adaptation are then off."""


def rescaled(values: Mapping[str, float], scale: float, offset: float) -> dict[str, float]:
    """``values`` carried onto another model's cosine scale by the affine map ``c -> offset + scale * c``
    measured between the two (e.g. from their target and non-target means on the same windows):
    cosines follow the map, margins (differences of cosines) scale, counts and factors (``WITHIN``) stay,
    since a factor multiplies a difference of cosines into another."""
    return {key: value if key in WITHIN else scale * value if key in MARGINS else offset + scale * value
            for key, value in values.items()}


def check_value(key: str, value: object) -> None:
    """ConfigError naming ``decision.<key>`` unless ``value`` is a number in the key's range."""
    low, high = (0.0, WITHIN[key]) if key in WITHIN else (0.0, 2.0) if key in MARGINS else (-1.0, 1.0)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    check(number and low <= value <= high, f"decision.{key}", value, f"must be a number within {low:g} to {high:g}")  # type: ignore[operator]


@dataclass(frozen=True)
class DecisionOverrides:
    """The config's ``[decision]`` section: any value set here wins over the model bundle's."""

    threshold: float | None = None
    relaxed_threshold: float | None = None
    relaxed_margin: float | None = None
    uncertain_band: float | None = None
    uncertain_margin: float | None = None
    decisive_margin: float | None = None
    tentative_score: float | None = None
    tentative_margin: float | None = None
    lead_in_score: float | None = None
    departure_drop: float | None = None
    join_threshold: float | None = None
    merge_threshold: float | None = None
    fold_threshold: float | None = None
    cohort_top_n: float | None = None
    cohort_gain: float | None = None
    cohort_clean_level: float | None = None
    room_join_lift: float | None = None
    room_score_penalty: float | None = None
    room_version_penalty: float | None = None
    adapt_windows: float | None = None
    adapt_margin: float | None = None
    adapt_penalty: float | None = None

    def __post_init__(self) -> None:
        for key, value in self.given().items():
            check_value(key, value)

    def given(self) -> dict[str, float]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True)
class ResolvedDecision:
    """The values in force and where each came from (``bundle`` or ``config``)."""

    values: DecisionValues
    source: Mapping[str, str]


def resolve(model: str, bundled: Mapping[str, Any], overrides: DecisionOverrides) -> ResolvedDecision:
    """The bundle's values with the config's on top; refuses when some value is given by neither."""
    given = overrides.given()
    merged = {**bundled, **given}
    missing = [k for k in DecisionValues.required() if k not in merged]
    if missing:
        raise DecisionValuesMissing(
            f"model {model!r} carries no calibrated decision values ({', '.join(missing)} missing): its cosine "
            f"scale is its own, so another model's thresholds would be meaningless. Run `speakerd calibrate "
            f"--known DIR --unknown DIR --write-bundle {model}` (docs/calibration.md), or set every missing "
            f"value under [decision] in the config"
        )
    values = DecisionValues(**{k: merged[k] for k in DecisionValues.names() if k in merged})
    return ResolvedDecision(values, {k: CONFIG if k in given else BUNDLE for k in DecisionValues.names()})


def for_bundle(bundle: ModelBundle, overrides: DecisionOverrides) -> ResolvedDecision:
    """The values a pipeline runs ``bundle`` with (see ``resolve``)."""
    return resolve(bundle.name, bundle.decision, overrides)


MOVED = {
    ("matching", "threshold"): "threshold",
    ("matching", "relaxed_threshold"): "relaxed_threshold",
    ("matching", "relaxed_margin"): "relaxed_margin",
    ("matching", "uncertain_band"): "uncertain_band",
    ("matching", "uncertain_margin"): "uncertain_margin",
    ("tracker", "decisive_margin"): "decisive_margin",
    ("tracker", "tentative_score"): "tentative_score",
    ("tracker", "tentative_margin"): "tentative_margin",
    ("tracker", "lead_in_score"): "lead_in_score",
    ("tracker", "departure_drop"): "departure_drop",
    ("tracker", "tail_score"): "threshold",
    ("provisional", "join_threshold"): "join_threshold",
    ("provisional", "merge_threshold"): "merge_threshold",
    ("provisional", "fold_threshold"): "fold_threshold",
}
"""Config keys that became the model's decision values: where each went (``[decision]``)."""


def check_bundled(values: Mapping[str, Any], where: str) -> dict[str, float]:
    """A manifest's ``decision`` section, checked: known names, numbers in range (may be partial)."""
    from ..bundle import BundleError

    if not isinstance(values, Mapping):
        raise BundleError(f"{where}: 'decision' must be an object of named values")
    unknown = sorted(set(values) - set(DecisionValues.names()))
    if unknown:
        raise BundleError(f"{where}: unknown decision values {', '.join(unknown)}; known: {', '.join(DecisionValues.names())}")
    for key, value in values.items():
        try:
            check_value(key, value)
        except SpeakerdError as e:
            raise BundleError(f"{where}: {e}") from None
    return dict(values)  # as written: a count stays an integer, so rebuilding leaves the manifest as tracked


def describe(bundle: ModelBundle, overrides: DecisionOverrides) -> str:
    """``speakerd models show``: the bundle, its decision values and where each comes from."""
    given = overrides.given()
    artifacts = ", ".join(f"{k}{'' if bundle.artifact(k) else ' (not built)'}" for k in bundle.artifacts) or "none"
    lines = [
        f"{bundle.name}  {bundle.fingerprint}",
        f"  {bundle.path}",
        *([f"  {bundle.description}"] if bundle.description else []),
        f"  {bundle.sample_rate} Hz, {bundle.embedding_dim}-d embeddings, {bundle.features.num_mel_bins} mel bins; artifacts: {artifacts}",
        *([f"  background cohort: {bundle.source['cohort']}"] if bundle.source.get("cohort") else []),
        "decision values:",
    ]
    missing = []
    for key in DecisionValues.names():
        if key in given:
            value, source = given[key], CONFIG + (f" (bundle: {bundle.decision[key]:g})" if key in bundle.decision else "")
        elif key in bundle.decision:
            value, source = bundle.decision[key], BUNDLE
        elif key in OPTIONAL:
            lines.append(f"  {key:<18} {'-':>7}  off")
            continue
        else:
            missing.append(key)
            lines.append(f"  {key:<18} {'-':>7}  missing")
            continue
        lines.append(f"  {key:<18} {value:7.3f}  {source}")
    if missing:
        lines.append(
            f"the daemon refuses to start with this model: run `speakerd calibrate --known DIR --unknown DIR "
            f"--write-bundle {bundle.name}`, or set {', '.join(missing)} under [decision]"
        )
    return "\n".join(lines)
