"""Benchmarks: `just bench` (python -m tests.bench). Scenarios follow shared/bench/SCENARIO.md."""
