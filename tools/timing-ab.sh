#!/usr/bin/env bash
# Issue 20's check of the comparator on one machine: the timing-ab plan run plainly (a), then
# with the planted regression (b: tests/planted_regression.py, extra matmuls before every
# transformer block). `quantgate compare a b` must say REGRESSION for the timings and exit 1.
# An A/A pair (two plain runs, e.g. tools/cold-warm.sh's cold and warm) must not.
# Usage: tools/timing-ab.sh OUTDIR [extra pytest args...]  -> OUTDIR/{a,b}/, OUTDIR/compare.txt
set -uo pipefail
out=${1:?usage: tools/timing-ab.sh OUTDIR [pytest args...]}; shift
tools/reference-run.sh "$out/a" --quantgate-plan timing-ab "$@"; echo "a exit $?" > "$out/a/exit"
tools/reference-run.sh "$out/b" --quantgate-plan timing-ab -p tests.planted_regression "$@"; echo "b exit $?" > "$out/b/exit"
. tools/staged-wheels.sh
PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} python3 -m quantgate.cli compare "$out/a/benchmark.json" "$out/b/benchmark.json" \
  > "$out/compare.txt" 2>&1
echo "compare exit $?" >> "$out/compare.txt"
