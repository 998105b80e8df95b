"""Benchmarks for trl_sstoken (not part of the installed package)."""
