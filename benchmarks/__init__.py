"""Reproducible benchmark studies (BENCHMARKS.md): one script per study, each writing
`benchmarks/results/<study>.md` (and a PNG where a curve says more).

Run one with `python -m benchmarks.<study> [--quick] [--out DIR]`; see `benchmarks/README.md`.
"""
