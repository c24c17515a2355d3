"""evim3 benchmarks: each bench_*.py module has run() -> dict; `python -m benchmarks` runs them all."""
