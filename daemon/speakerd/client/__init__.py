"""speakerd's subscriber library: who spoke when, ready to query (see docs/client.md).

``SpeakerTimeline`` folds the daemon's events into segments with names, revised as changes are
confirmed or withdrawn, turns cut, speakers renamed or merged; ``Subscriber`` connects to a
running daemon (endpoint and CURVE keys from its config, as ``speakerd listen``), survives its
restarts, reports lost events and feeds a timeline. Neither imports torch or the pipeline.
"""

from .subscriber import Gap, Subscriber
from .timeline import SpeakerTimeline
from .types import Clock, Line, Revision, Span, TimelineSettings, Who
from ..events import SpeakerRef

__all__ = ["Clock", "Gap", "Line", "Revision", "Span", "SpeakerRef", "SpeakerTimeline", "Subscriber", "TimelineSettings", "Who"]
