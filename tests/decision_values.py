"""The decision values unit tests run with: ge2e-resemblyzer's calibrated ones (docs/calibration.md)."""

from __future__ import annotations

from speakerd.decisions.values import DecisionValues
from speakerd.models.build import GE2E_DECISION

GE2E = DecisionValues(**GE2E_DECISION)
