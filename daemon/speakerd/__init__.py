"""speakerd: tells other programs, as it happens, who is speaking."""

__version__ = "0.1.0"
