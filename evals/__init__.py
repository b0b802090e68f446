"""Benchmarks and evaluation harnesses; each prints ratios against a same-run baseline."""
