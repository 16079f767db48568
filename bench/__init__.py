"""Benchmarks: one script per op plus end-to-end; run as `python -m bench.<name>`."""
