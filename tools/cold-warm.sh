#!/usr/bin/env bash
# The main job twice on one fresh machine: first with empty caches (synthetic weights,
# calibration statistics, quantized checkpoints, inductor), then again with them warm.
# Usage: tools/cold-warm.sh OUTDIR [extra pytest args...]  -> OUTDIR/{cold,warm}/
set -uo pipefail
out=${1:?usage: tools/cold-warm.sh OUTDIR [pytest args...]}; shift
tools/reference-run.sh "$out/cold" "$@"; echo "cold exit $?" > "$out/cold/exit"
tools/reference-run.sh "$out/warm" "$@"; echo "warm exit $?" > "$out/warm/exit"
