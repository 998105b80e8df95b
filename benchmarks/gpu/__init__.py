"""The prepared GPU check (see README.md): python -m benchmarks.gpu.check --out $OUT."""
