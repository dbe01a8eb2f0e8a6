"""s2v-curate: curation pipeline for multi-subject subject-to-video training data."""

__version__ = "0.1.0"
