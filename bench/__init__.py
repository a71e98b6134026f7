"""Benchmarks (`python -m bench`)."""
