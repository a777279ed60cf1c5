#!/usr/bin/env bash
# Device run: FLUX.1-schnell (synthetic, 1024px, 4 steps, batch 1) under a 16 GiB GPU budget
# (torch's allocator capped; see README "Memory budgets and offload"). bf16 with group offload
# is the baseline; each quantized scheme runs with its transformer resident and only the text
# encoders streamed from the CPU (encoder-offload: a quantized FLUX transformer plus the 9.5 GB
# bf16 T5 do not fit 16 GiB together, and torchao's float8 weights cannot be moved between
# devices, so diffusers' model offload fails for fp8-row). CASES (a pytest -k expression) picks
# the cases; the first H200 run used
#   bf16-group-offload or bf16-model-offload or bnb-nf4-model-offload or fp8-row-model-offload
#   or svdquant-ref-eager or svdquant-ref-model-offload
# One timed round each: offloaded runs are slow and the device time is short. Each test has a
# time budget (CASE_TIMEOUT_S, default 300 s), so one slow case costs itself, not the session.
# Usage: tools/runs/budget-16g.sh OUTDIR [pytest args]
set -u
out=${1:?usage: tools/runs/budget-16g.sh OUTDIR [pytest args]}; shift
timeout -s INT -k 30 "${PART_S:-480}" tools/reference-run.sh "$out/run" \
  tests/test_budget.py tests/test_end_to_end.py::test_prompt_to_image \
  --quantgate-models flux-schnell --quantgate-source synthetic \
  --quantgate-schemes bf16,bnb-nf4,fp8-row,svdquant-ref \
  --quantgate-variants eager,model-offload,group-offload,encoder-offload \
  -k "${CASES:-bf16-group-offload or encoder-offload and not bf16-encoder-offload}" \
  --quantgate-gpu-budget 16GiB --quantgate-rounds 1 --quantgate-warmup 0 \
  --quantgate-case-timeout "${CASE_TIMEOUT_S:-300}" \
  --quantgate-calibration-samples "${CALIBRATION_SAMPLES:-8}" -rs "$@"
exit 0
