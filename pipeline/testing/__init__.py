"""Harnesses for tests and benchmarks: a loopback Ray cluster, tiny models, synthetic shards. The product never
imports it."""
