"""Benchmarks for pacsbridge, run side by side with its peers (see bench/README.md)."""
