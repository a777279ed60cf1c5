"""Benchmark JSON files of quantgate runs: their layout (``schema``), reading one (``reader``),
merging several (``merge``). Imports nothing of ``quantgate.history`` or ``quantgate.report``."""

from quantgate.results.merge import load_runs, merge_benchmark_json, merge_worker_runs
from quantgate.results.reader import Result, RunSet, load_benchmark_json
from quantgate.results.schema import SCHEMA_VERSION

__all__ = ["SCHEMA_VERSION", "Result", "RunSet", "load_benchmark_json", "load_runs", "merge_benchmark_json",
           "merge_worker_runs"]
