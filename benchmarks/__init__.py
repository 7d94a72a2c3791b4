"""Benchmarks: throughput, latency and post-processing against their baselines (see README.md)."""
