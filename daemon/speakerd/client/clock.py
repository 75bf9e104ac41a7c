"""One daemon session's two clocks: stream seconds (the sample clock) and Unix time.

Every event is an anchor ``(stream_time, wall_time)`` (docs/events.md, "Clocks"). The newest
anchor is the best for recent times, but over a day the sound card's clock drifts from the
system's by seconds, so older times are converted with the anchor of their own time: one anchor
is kept per ``ANCHOR_STEP_S`` of stream time, each holding the newest offset seen in its step.
"""

from __future__ import annotations

import bisect

ANCHOR_STEP_S = 10.0


class SessionClock:
    def __init__(self) -> None:
        self._stream: list[float] = []  # anchor positions, stream seconds, increasing
        self._wall: list[float] = []  # the same positions in Unix time
        self._offset: list[float] = []  # wall - stream at each anchor
        self.last_stream = 0.0
        self.last_wall = 0.0

    def anchor(self, stream_time: float, wall_time: float) -> None:
        self.last_stream = max(self.last_stream, stream_time)
        self.last_wall = max(self.last_wall, wall_time)
        offset = wall_time - stream_time
        if self._stream and stream_time < self._stream[-1] + ANCHOR_STEP_S:
            if stream_time >= self._stream[-1]:  # the newest event of the step speaks for it
                self._offset[-1] = offset
                self._wall[-1] = self._stream[-1] + offset
            return
        self._stream.append(stream_time)
        self._wall.append(wall_time)
        self._offset.append(offset)

    def to_wall(self, t: float) -> float:
        if not self._offset:
            return t
        return t + self._offset[max(0, bisect.bisect_right(self._stream, t) - 1)]

    def to_stream(self, wall: float) -> float:
        if not self._offset:
            return wall
        return wall - self._offset[max(0, bisect.bisect_right(self._wall, wall) - 1)]

    def forget(self, before: float) -> None:
        """Drop anchors for stream times before ``before``, keeping the one in force there."""
        n = max(0, bisect.bisect_right(self._stream, before) - 1)
        if n:
            del self._stream[:n], self._wall[:n], self._offset[:n]
