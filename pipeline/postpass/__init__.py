"""Passes over a finished output directory: cross-pair synthesis and re-filtering with new thresholds."""
