#!/usr/bin/env bash
# The reference GPU run: the main job exactly as the README gives it (pytest -m gpu
# --benchmark-json=...), its log and environment kept
# beside the benchmark JSON. Usage: tools/reference-run.sh OUTDIR [extra pytest args...]
# Wheels missing on the machine may be staged in ./.whl (see README, "GPU machines without
# network"); they are installed into a private site directory, never over the system's.
set -uo pipefail
out=${1:?usage: tools/reference-run.sh OUTDIR [pytest args...]}; shift
mkdir -p "$out"
. tools/staged-wheels.sh
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
{ nvidia-smi || true; df -h /tmp . || true; python3 -c 'import json, quantgate.hardware as h; print(json.dumps(h.machine_facts(), indent=1))'; } > "$out/environment.txt" 2>&1
# progress.log: the same lines, each prefixed with the seconds since the start, so a run cut
# short still shows where its time went (the JSON's phases are written only at the end).
stamp() { local t0=$SECONDS line; while IFS= read -r line; do printf '%5ds %s\n' "$((SECONDS - t0))" "$line"; done; }
QUANTGATE_COMMIT=${QUANTGATE_COMMIT:-$(git rev-parse HEAD 2>/dev/null)} python3 -m pytest -m gpu --benchmark-json="$out/benchmark.json" "$@" 2>&1 \
  | tee "$out/pytest.log" >(stamp > "$out/progress.log")
exit "${PIPESTATUS[0]}"
