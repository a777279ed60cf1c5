"""Rendering of benchmark results for people."""

from quantgate.report.summary import load_benchmark_json, summary_markdown

__all__ = ["load_benchmark_json", "summary_markdown"]
