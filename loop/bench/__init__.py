"""Benchmarks: `python -m loop.bench <name>`. Not tests: they print a table and write docs/, never assert on time."""
