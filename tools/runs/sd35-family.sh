#!/usr/bin/env bash
# Device run: SD3.5 Medium (synthetic, 1024px, model defaults) over the whole scheme family.
# Three pytest sessions, each bounded so a slow part cannot take the others' JSON with it
# (SIGINT lets pytest-benchmark write its JSON). Usage: tools/runs/sd35-family.sh OUTDIR
set -u
out=${1:?usage: tools/runs/sd35-family.sh OUTDIR}
common=(--quantgate-models sd35-medium --quantgate-source synthetic --quantgate-quality-prompts 2
        --quantgate-golden-dir "$out/golden" --quantgate-artifacts "$out/artifacts")
# A: the schemes that run at bf16-like speed, eager, every test; bf16 writes the golden set.
timeout -s INT -k 30 "${PART_A_S:-320}" tools/reference-run.sh "$out/a" "${common[@]}" \
  --quantgate-schemes bf16,bnb-nf4,int8-wo,fp8-row,fp8-tensor,sparse24-int8-dq --quantgate-update-golden
# B: the slow paths (int8 dynamic, int4 weight-only: 5-12x bf16 per forward on FLUX) at
# transformer scope only, one timed round; bf16 again as the speedup and output reference.
timeout -s INT -k 30 "${PART_B_S:-90}" tools/reference-run.sh "$out/b" "${common[@]}" \
  --quantgate-schemes bf16,int8-dq,int4-wo --quantgate-rounds 1 -k "not end_to_end and not images_match"
# C: torch.compile of the repeated blocks for bf16 and fp8-row (bf16 eager as the baseline).
timeout -s INT -k 30 "${PART_C_S:-150}" tools/reference-run.sh "$out/c" "${common[@]}" \
  --quantgate-schemes bf16,fp8-row --quantgate-variants eager,compile -k "compile or bf16-eager"
exit 0
