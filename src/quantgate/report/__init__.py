"""Rendering of benchmark results for people, and joining runs split over several commands."""

from quantgate.report.merge import merge_benchmark_json
from quantgate.report.summary import load_benchmark_json, summary_markdown

__all__ = ["load_benchmark_json", "merge_benchmark_json", "summary_markdown"]
