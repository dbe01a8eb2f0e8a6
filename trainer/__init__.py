"""Flow-matching DiT trainer that reads the pipeline's shards directly (arrives in a later release)."""
