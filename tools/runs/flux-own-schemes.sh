#!/usr/bin/env bash
# Device run: FLUX.1-schnell (synthetic, 1024px, 4 steps, batch 1) for quantgate's own SVDQuant
# reference, LoRA on the quantized pipelines, and full-size quality against a golden set written
# by bf16 in the same session. Schemes in order of need: bf16 (the reference), bnb-nf4 (the
# baseline svdquant-ref is compared with), svdquant-ref, then int8-wo and fp8-row (LoRA gates).
# Usage: tools/runs/flux-own-schemes.sh OUTDIR [pytest args]
set -u
out=${1:?usage: tools/runs/flux-own-schemes.sh OUTDIR [pytest args]}; shift
timeout -s INT -k 30 "${PART_S:-520}" tools/reference-run.sh "$out/run" \
  tests/test_memory.py tests/test_performance.py::test_transformer_forward \
  tests/test_performance.py::test_transformer_speedup tests/test_quality.py tests/test_svdquant.py tests/test_lora.py \
  --quantgate-models flux-schnell --quantgate-source synthetic --quantgate-schemes bf16,bnb-nf4,svdquant-ref,int8-wo,fp8-row \
  --quantgate-calibration-samples "${CALIBRATION_SAMPLES:-8}" --quantgate-quality-prompts 2 \
  --quantgate-update-golden --quantgate-golden-dir "$out/golden" --quantgate-artifacts "$out/artifacts" -rs "$@"
exit 0
