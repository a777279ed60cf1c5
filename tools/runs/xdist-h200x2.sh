#!/usr/bin/env bash
# Device run on nvidia-h200-x2: the same gate selection in one process and with -n 2 (one GPU
# per worker), then the comparison (same results, medians within the measured spread, wall
# times and their ratio). Usage: tools/runs/xdist-h200x2.sh OUTDIR [pytest args]
#
# The selection leaves out the tests that compare one case with another (speedups): under -n
# the baseline may run on the other worker, so they would skip there and not in one process.
# The synthetic weights are built first, outside both timed sessions (two workers would
# otherwise build the same 34 GB at once), which also leaves them in the page cache for both.
# pytest-xdist and execnet must be importable: stage their wheels in ./.whl if the machine
# lacks them (README, "GPU machines without network").
# MARK=cpu MATERIALIZE=0 runs the same steps on the CPU tier (a dry run of this script).
set -u
out=${1:?usage: tools/runs/xdist-h200x2.sh OUTDIR [pytest args]}; shift
mkdir -p "$out"
. tools/staged-wheels.sh
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python="${PYTHON:-python3}"
"$python" -c 'import xdist, execnet' || { echo "pytest-xdist/execnet missing: stage their wheels in .whl" >&2; exit 1; }
{ nvidia-smi -L || true; } > "$out/gpus.txt" 2>&1
if [ "${MATERIALIZE:-1}" = 1 ]; then
  "$python" -m quantgate.cli materialize flux-schnell > "$out/materialize.log" 2>&1 || exit 1
fi
selection=(tests/test_performance.py tests/test_memory.py tests/test_end_to_end.py -k "not speedup"
           -m "${MARK:-gpu}" -p no:cacheprovider --rootdir "$PWD"
           --quantgate-models flux-schnell --quantgate-source synthetic
           --quantgate-schemes "${SCHEMES:-bf16,int8-wo,int8-dq,fp8-row}" "$@")
t0=$(date +%s.%N)
"$python" -m pytest "${selection[@]}" --benchmark-json="$out/single.json" > "$out/single.log" 2>&1
t1=$(date +%s.%N)
"$python" -m pytest "${selection[@]}" -n 2 --benchmark-json="$out/xdist.json" > "$out/xdist.log" 2>&1
t2=$(date +%s.%N)
tail -n 3 "$out/single.log" "$out/xdist.log"
"$python" -m quantgate.report.spread "$out/single.json" "$out/xdist.json" \
  --walls "$("$python" -c "print($t1 - $t0)")" "$("$python" -c "print($t2 - $t1)")" -o "$out/spread.json" \
  | tee "$out/spread.txt"
