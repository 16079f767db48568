"""Benchmarks: one script per op plus end-to-end. In a checkout `python -m bench.<name>`; installed,
`python -m fuselm.bench.<name>` or `fuselm bench` (all of them, bench/run.py)."""
