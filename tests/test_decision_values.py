"""The decision values belong to the model: read from its bundle, overridden by the config, written by
calibrate, shown by `models show`; a bundle without them refuses to start."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from decision_values import GE2E

from speakerd import cli
from speakerd.bundle import BundleError, load_bundle, resolve_bundle
from speakerd.calibrate import write_bundle_values
from speakerd.decisions.values import (
    OPTIONAL,
    DecisionOverrides,
    DecisionValues,
    DecisionValuesMissing,
    describe,
    for_bundle,
    resolve,
)
from speakerd.errors import ConfigError
from speakerd.models.build import GE2E_DECISION
from speakerd.settings import load_settings


def bundle_copy(tmp_path: Path, decision: dict | None) -> Path:
    """The default bundle's manifest (and its model, linked) in a folder of its own, with ``decision``."""
    src = resolve_bundle("ge2e-resemblyzer").path
    dst = tmp_path / "bundle"
    dst.mkdir(parents=True)
    manifest = json.loads((src / "manifest.json").read_text())
    manifest.pop("decision", None)
    if decision is not None:
        manifest["decision"] = decision
    (dst / "manifest.json").write_text(json.dumps(manifest))
    (dst / "model.onnx").symlink_to(src / "model.onnx")
    return dst


def test_the_default_bundle_carries_its_calibrated_values() -> None:
    bundle = resolve_bundle("ge2e-resemblyzer")
    resolved = for_bundle(bundle, DecisionOverrides())
    assert resolved.values == GE2E and resolved.values.to_dict() == GE2E_DECISION
    assert set(resolved.source.values()) == {"bundle"}


def test_config_overrides_any_value_and_says_so() -> None:
    resolved = resolve("m", GE2E_DECISION, DecisionOverrides(threshold=0.72, join_threshold=0.75))
    assert (resolved.values.threshold, resolved.values.join_threshold, resolved.values.fold_threshold) == (0.72, 0.75, 0.78)
    assert {k for k, v in resolved.source.items() if v == "config"} == {"threshold", "join_threshold"}


def test_without_values_from_the_bundle_or_the_config_nothing_decides() -> None:
    with pytest.raises(DecisionValuesMissing) as err:
        resolve("wespeaker-resnet34", {"threshold": 0.5}, DecisionOverrides(fold_threshold=0.6))
    message = str(err.value)
    assert "speakerd calibrate" in message and "--write-bundle wespeaker-resnet34" in message
    assert "relaxed_threshold" in message and "fold_threshold" not in message.split("(")[1].split(")")[0]
    everything = resolve("wespeaker-resnet34", {}, DecisionOverrides(**GE2E_DECISION))
    assert everything.values == GE2E and set(everything.source.values()) == {"config"}


def test_a_bundle_without_values_refuses_to_start(tmp_path: Path, default_model: Path, caplog: pytest.LogCaptureFixture) -> None:
    bundle = bundle_copy(tmp_path, None)
    wav = tmp_path / "quiet.wav"
    sf.write(str(wav), np.zeros(16000, np.float32), 16000)
    store = tmp_path / "store"
    assert cli.main(["run", "--source", f"file:{wav}", "--model", str(bundle), "--store", str(store)]) == 2
    assert f"--write-bundle {load_bundle(bundle).name}" in caplog.text
    assert not store.exists(), "nothing started"


def test_old_threshold_keys_say_where_they_went(tmp_path: Path) -> None:
    for section, key, new in (("matching", "threshold", "threshold"), ("tracker", "tail_score", "threshold"),
                              ("provisional", "fold_threshold", "fold_threshold")):
        cfg = tmp_path / f"{section}.toml"
        cfg.write_text(f"[{section}]\n{key} = 0.7\n")
        with pytest.raises(ConfigError, match=f"decision.{new}"):
            load_settings(cfg)
    cfg = tmp_path / "decision.toml"
    cfg.write_text("[decision]\nthreshold = 0.71\n")
    assert load_settings(cfg).decision.threshold == 0.71
    with pytest.raises(ConfigError, match="decision.decisive_margin"):
        DecisionOverrides(decisive_margin=-1.0)


def test_a_manifest_with_an_unknown_or_bad_value_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="unknown decision values tail_score"):
        load_bundle(bundle_copy(tmp_path / "a", {"tail_score": 0.7}))
    with pytest.raises(BundleError, match="decision.threshold"):
        load_bundle(bundle_copy(tmp_path / "b", {"threshold": 3}))


def test_models_show_says_where_each_value_comes_from(tmp_path: Path) -> None:
    shown = describe(resolve_bundle("ge2e-resemblyzer"), DecisionOverrides(threshold=0.72)).splitlines()
    row = {line.split()[0]: line.split()[1:] for line in shown if line.startswith("  ") and len(line.split()) >= 3}
    assert row["threshold"] == ["0.720", "config", "(bundle:", "0.7)"]
    assert row["fold_threshold"] == ["0.780", "bundle"]
    partial = describe(load_bundle(bundle_copy(tmp_path, {"threshold": 0.5})), DecisionOverrides())
    assert "relaxed_threshold        -  missing" in partial and "--write-bundle" in partial.splitlines()[-1]


def test_calibrate_writes_into_the_bundle(tmp_path: Path) -> None:
    path = bundle_copy(tmp_path, {"threshold": 0.5, "tentative_margin": 0.2})
    written, derived = write_bundle_values(load_bundle(path), 0.45, 0.6)
    again = load_bundle(path)
    assert again.decision == written.decision
    # the room values (cohort, adaptation) are measured per model, never carried over from GE2E's
    assert set(again.decision) == set(DecisionValues.required())
    assert (again.decision["threshold"], again.decision["fold_threshold"]) == (0.45, 0.6)  # measured
    assert again.decision["tentative_margin"] == 0.2  # kept
    assert again.decision["lead_in_score"] == pytest.approx(0.45 - 0.15) and "lead_in_score" in derived
    assert again.decision["decisive_margin"] == GE2E.decisive_margin  # a margin is carried over as is
    assert for_bundle(again, DecisionOverrides()).values == replace(
        GE2E, **{k: again.decision[k] for k in DecisionValues.required()}, **dict.fromkeys(OPTIONAL, 0.0)
    )



def test_models_show_on_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[decision]\njoin_threshold = 0.75\n")
    assert cli.main(["models", "show", "ge2e-resemblyzer", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "ge2e-resemblyzer:" in out and "join_threshold       0.750  config (bundle: 0.72)" in out
    assert "threshold            0.700  bundle" in out


def test_values_carried_to_another_cosine_scale_move_cosines_scale_margins_and_keep_factors() -> None:
    from speakerd.decisions.values import rescaled

    moved = rescaled(GE2E_DECISION, 1.63, -0.752)
    assert moved["threshold"] == pytest.approx(-0.752 + 1.63 * 0.70)  # a cosine follows the map
    assert moved["cohort_clean_level"] == pytest.approx(-0.752 + 1.63 * 0.585)
    assert moved["decisive_margin"] == pytest.approx(1.63 * 0.05)  # a difference only scales
    assert moved["room_version_penalty"] == pytest.approx(1.63 * 0.065)
    for factor in ("cohort_top_n", "cohort_gain", "room_join_lift", "room_score_penalty", "adapt_windows"):
        assert moved[factor] == GE2E_DECISION[factor]
    # the order of the bars is kept: what named before still names first
    assert moved["lead_in_score"] < moved["tentative_score"] < moved["relaxed_threshold"] < moved["threshold"] < moved["join_threshold"]
    DecisionValues(**moved)  # every value still in its range
