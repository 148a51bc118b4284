"""Benchmarks: latency and Dice-parity suites with JSON, Markdown and plot reports."""
