"""``python -m speakerd``: the ``speakerd`` console script, for an environment whose scripts are not on PATH."""

from .cli import main

raise SystemExit(main())
