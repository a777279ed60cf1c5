#!/usr/bin/env bash
# Issue 20's check of the comparator on one machine: the timing-ab plan run plainly (a), then
# with the planted regression (b: tests/planted_regression.py, extra matmuls before every
# transformer block). `quantgate compare a b` must say REGRESSION for the timings and exit 1.
# Then the plain plan again (a2): `quantgate compare a a2`, an A/A pair on the same warm machine,
# must not say REGRESSION (exit 0).
# Usage: tools/timing-ab.sh OUTDIR [extra pytest args...]
#   -> OUTDIR/{a,b,a2}/, OUTDIR/compare.txt (A/B), OUTDIR/aa-compare.txt (A/A)
set -uo pipefail
out=${1:?usage: tools/timing-ab.sh OUTDIR [pytest args...]}; shift
tools/reference-run.sh "$out/a" --quantgate-plan timing-ab "$@"; echo "a exit $?" > "$out/a/exit"
tools/reference-run.sh "$out/b" --quantgate-plan timing-ab -p tests.planted_regression "$@"; echo "b exit $?" > "$out/b/exit"
tools/reference-run.sh "$out/a2" --quantgate-plan timing-ab "$@"; echo "a2 exit $?" > "$out/a2/exit"
. tools/staged-wheels.sh
PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} python3 -m quantgate.cli compare "$out/a/benchmark.json" "$out/b/benchmark.json" \
  > "$out/compare.txt" 2>&1
echo "compare exit $?" >> "$out/compare.txt"
PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} python3 -m quantgate.cli compare "$out/a/benchmark.json" "$out/a2/benchmark.json" \
  > "$out/aa-compare.txt" 2>&1
echo "compare exit $?" >> "$out/aa-compare.txt"
