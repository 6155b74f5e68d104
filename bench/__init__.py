"""Benchmarks: ``nox -s bench`` (or ``python -m bench``) writes docs/performance.md."""
