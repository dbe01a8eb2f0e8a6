"""The output directory, on any storage: the ledger, staging and per-source assembly, the one shard writer and
reader (with shard assembly on the nodes), and the run's outputs (index, manifest, summary, funnel)."""
