"""Benchmarks: throughput against the floor, a whole run, and the memory of a sweep."""
