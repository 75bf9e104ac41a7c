"""A stand-in for ``sounddevice.InputStream`` that tests drive by calling its callback."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np


class FakeInputStream:
    """Records how it was opened; ``feed`` delivers a block as PortAudio's callback would."""

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.callback = kwargs["callback"]
        self.started = self.closed = False

    def start(self) -> None:
        self.started = True

    def stop(self) -> None:
        self.started = False

    def close(self) -> None:
        self.closed = True

    def feed(self, block: np.ndarray, *, overflow: bool = False, adc: float = 0.0, current: float = 0.0) -> None:
        block = block.reshape(len(block), -1).astype(np.float32)
        info = SimpleNamespace(inputBufferAdcTime=adc, currentTime=current, outputBufferDacTime=0.0)
        self.callback(block, len(block), info, SimpleNamespace(input_overflow=overflow))
