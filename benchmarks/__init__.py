"""Benchmark scripts: run each as `python -m benchmarks.<name>` from the repository root; they print a table
and write JSON under benchmarks/results/. Tests never import them."""
