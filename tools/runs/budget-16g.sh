#!/usr/bin/env bash
# Device run: FLUX.1-schnell (synthetic, 1024px, 4 steps, batch 1) under a 16 GiB GPU budget
# (torch's allocator capped; see README "Memory budgets and offload"). bf16 runs first with
# group offload (the baseline; model offload is there to show a 22 GiB bf16 transformer cannot
# be one whole model on a 16 GiB card), then bnb-nf4 and fp8-row with model offload, then
# svdquant-ref without offload (the 16 GB claim) and with model offload. One timed round each:
# offloaded runs are slow and the device time is short. Each test has a time budget
# (CASE_TIMEOUT_S, default 300 s), so one slow offload costs its case, not the session.
# Usage: tools/runs/budget-16g.sh OUTDIR [pytest args]
set -u
out=${1:?usage: tools/runs/budget-16g.sh OUTDIR [pytest args]}; shift
timeout -s INT -k 30 "${PART_S:-480}" tools/reference-run.sh "$out/run" \
  tests/test_budget.py tests/test_end_to_end.py::test_prompt_to_image \
  --quantgate-models flux-schnell --quantgate-source synthetic \
  --quantgate-schemes bf16,bnb-nf4,fp8-row,svdquant-ref --quantgate-variants eager,model-offload,group-offload \
  -k "bf16-group-offload or bf16-model-offload or bnb-nf4-model-offload or fp8-row-model-offload or svdquant-ref-eager or svdquant-ref-model-offload" \
  --quantgate-gpu-budget 16GiB --quantgate-rounds 1 --quantgate-warmup 0 \
  --quantgate-case-timeout "${CASE_TIMEOUT_S:-300}" \
  --quantgate-calibration-samples "${CALIBRATION_SAMPLES:-8}" -rs "$@"
exit 0
