"""Model bundles that speakerd knows how to build from upstream weights (torch needed only to build)."""

from .build import BUILDERS, Builder, BuildError, build_model, list_models

__all__ = ["BUILDERS", "BuildError", "Builder", "build_model", "list_models"]
