"""Benchmark scripts: run as `python -m benchmarks.NAME`; results go to benchmarks/results/."""
