"""Reproducible conversations from per-speaker clips, and the figures that judge the daemon on them."""
