"""Who is speaking, decided in one place with the model's own thresholds.

- ``values``: the model's decision values (``DecisionValues``), from its bundle and the config;
- ``evidence``: what one window says (``Match``, ``MatchedWindow``);
- ``policy``: every threshold check, as pure functions;
- ``clustering``: open-set clustering of unnamed speech into provisional speakers;
- ``turns``: turns, segments, change points;
- ``tracker``: the state machine (``Phase``) from evidence to changes and segments;
- ``layer``: ``DecisionLayer``, embedded windows in, event payloads out.
"""
