"""Benchmarks run by `kvcache bench ...`: each measures its baseline in the same run."""
