"""Tiny real components built from config, for tests and benchmarks (seeded, CPU-sized)."""
