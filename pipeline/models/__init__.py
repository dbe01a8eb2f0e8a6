"""Model loading: the one loader (local directory or hub id from the config, never a download at run time) and the
weights that packages ship."""
