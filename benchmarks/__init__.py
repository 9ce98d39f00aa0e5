"""Benchmark harnesses of s2l-monai (not part of the installed package); see ``benchmarks/README.md``."""
