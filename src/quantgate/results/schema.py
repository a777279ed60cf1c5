"""The layout of a quantgate benchmark JSON: pytest-benchmark's file plus a ``quantgate`` section.

Every key quantgate reads or writes in that section is named here, so a writer and the reader
(``quantgate.results.reader``) agree by name rather than by a repeated string.
"""

from __future__ import annotations

# The layout of the "quantgate" section. Raise it when a reader of the old layout would misread
# the new one; files without the field are schema 1.
SCHEMA_VERSION = 1

SECTION = "quantgate"  # the top-level key of the section

# The case attributes a benchmark's extra_info, a verdict and an outcome carry.
CASE_FIELDS = ("model", "source", "scheme", "variant", "batch", "device")

# -- keys of the section ---------------------------------------------------------------------
# written by a pytest session (quantgate.plugin's summary)
VERSION = "version"
SCHEMA = "schema"
GATES_FILE = "gates_file"
GATES_SHA256 = "gates_sha256"
SELECTION = "selection"
PLAN = "plan"
NOT_GENERATED = "not_generated"  # (test, case) pairs left out, counted by reason
WALL_SECONDS = "wall_seconds"
PHASES = "phases"
VERDICTS = "verdicts"
ARTIFACTS = "artifacts"
RELEASES = "releases"
TIMEOUTS = "timeouts"
OUTCOMES = "outcomes"  # nodeid -> outcome record
INTERRUPTED = "interrupted"  # Ctrl-C: where the run stopped
# written by the sub-plugins
GPU_BUDGET = "gpu_budget"  # budget_plugin (--quantgate-gpu-budget)
PARTIAL = "partial"  # timeouts: a hung test's watchdog wrote the file
SPREAD_BY = "spread_by"  # distribute: what a worker or shard gets whole
SHARD = "shard"  # distribute: this file is one shard (--quantgate-shard)
WORKER = "worker"  # distribute: this file is one xdist worker's
# written by quantgate eval
EVALUATION = "evaluation"
# written by a merge (quantgate.results.merge)
PARTS = "parts"  # one record per merged file
SHARDS = "shards"  # what the merged shards cover
XDIST = "xdist"  # the workers of one xdist session

SECTION_KEYS = frozenset({
    VERSION, SCHEMA, GATES_FILE, GATES_SHA256, SELECTION, PLAN, NOT_GENERATED, WALL_SECONDS, PHASES, VERDICTS,
    ARTIFACTS, RELEASES, TIMEOUTS, OUTCOMES, INTERRUPTED, GPU_BUDGET, PARTIAL, SPREAD_BY, SHARD, WORKER, EVALUATION,
    PARTS, SHARDS, XDIST,
})

# -- extra_info keys a merge adds to each benchmark -------------------------------------------
PART_KEY = "quantgate_part"  # the index of its file among the merged ones
WORKER_KEY = "quantgate_worker"  # the xdist worker it ran on
GPU_KEY = "quantgate_gpu"  # that worker's GPU
