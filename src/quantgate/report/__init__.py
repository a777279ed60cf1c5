"""Reports people read (HTML and a Markdown twin), benchmark history comparison, merging runs."""

from quantgate.report.merge import merge_benchmark_json
from quantgate.report.runs import RunSet, load_benchmark_json, load_runs

__all__ = ["RunSet", "load_benchmark_json", "load_runs", "merge_benchmark_json"]
