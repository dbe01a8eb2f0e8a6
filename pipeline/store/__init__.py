"""The output directory: the ledger, per-source assembly and spooling, the one shard writer and reader, and the run's
outputs (index, manifest, summary, funnel)."""
