"""Cost benchmarks: CPU side-by-side (run.py), sequence-length scaling, the attention statistic alone."""
