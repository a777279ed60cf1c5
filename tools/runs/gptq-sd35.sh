#!/usr/bin/env bash
# Device run: GPTQ W4A8 on SD3.5 Medium (synthetic, 1024px, 40 steps, CFG 4.5, batch 1) against
# bf16, its round-to-nearest baseline and bnb-nf4. Usage: tools/runs/gptq-sd35.sh OUTDIR
#
# 1. tools/probe_w4a8.py: where W4A8's time goes on SD3.5's layer shapes (seconds).
# 2. One pytest session of the main job, bounded so a slow part cannot take the JSON with it
#    (SIGINT lets pytest-benchmark write it). Order matters: bf16 first (the references), then
#    rtn-w4a8 (GPTQ's error is divided by its error), then gptq-w4a8, which calibrates on
#    CALIBRATION_SAMPLES images (default 16) and quantizes inside its load (times, cache hits
#    and the observed W4A8 paths are in each benchmark's extra_info.pipeline.notes), then bnb-nf4
#    last: only its latency is needed, and `quantgate report` computes speedups over it.
# Extra arguments go to pytest (e.g. -k "not lora").
set -u
out=${1:?usage: tools/runs/gptq-sd35.sh OUTDIR [pytest args]}; shift
mkdir -p "$out"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 tools/probe_w4a8.py > "$out/probe-w4a8.txt" 2>&1
timeout -s INT -k 30 "${PART_S:-520}" tools/reference-run.sh "$out/run" \
  --quantgate-models sd35-medium --quantgate-source synthetic --quantgate-quality-prompts 2 \
  --quantgate-calibration-samples "${CALIBRATION_SAMPLES:-16}" \
  --quantgate-schemes bf16,rtn-w4a8,gptq-w4a8,bnb-nf4 "$@"
exit 0
