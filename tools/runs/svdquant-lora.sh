#!/usr/bin/env bash
# Device run: LoRA on svdquant-ref (the LoRA concatenated into the low-rank branches, no
# re-quantization) on FLUX.1-schnell (synthetic, 1024px, 4 steps, batch 1). bf16 runs first: it
# writes the with/without-LoRA references the svdquant-ref gates compare with. The transformer
# forward timings feed test_lora_forward_overhead.
# Usage: tools/runs/svdquant-lora.sh OUTDIR [pytest args]
set -u
out=${1:?usage: tools/runs/svdquant-lora.sh OUTDIR [pytest args]}; shift
timeout -s INT -k 30 "${PART_S:-480}" tools/reference-run.sh "$out/run" \
  tests/test_performance.py::test_transformer_forward tests/test_lora.py \
  tests/test_svdquant.py::test_a_lora_goes_into_the_branches_and_leaves_the_residuals_untouched \
  --quantgate-models flux-schnell --quantgate-source synthetic --quantgate-schemes bf16,svdquant-ref \
  --quantgate-calibration-samples "${CALIBRATION_SAMPLES:-8}" -rs "$@"
exit 0
