"""Benchmarks: one script per question, JSON results under bench/results/."""
