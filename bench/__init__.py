"""Benchmarks of ModelPress: `python -m bench.run` (or `make bench`) writes BENCHMARKS.md and bench/results.json.

Benchmarks print figures; they are not tests. tests/test_bench_smoke.py runs every
section at `--size tiny` so none of them rots.
"""
