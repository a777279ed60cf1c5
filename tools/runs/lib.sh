# Sourced by the multi-GPU device recipes: node ids for a selection and one bounded pytest session
# per GPU. Callers set $out (the run directory) and $bound (seconds per session).

ids() {  # ids FILE::TEST PREFIX SUFFIX SCHEME... -> one node id per scheme
  local test=$1 prefix=$2 suffix=$3; shift 3
  for s in "$@"; do printf '%s[%s-%s-%s]\n' "$test" "$prefix" "$s" "$suffix"; done
}
quality() {  # quality PREFIX SCHEME... -> the four quality tests of each eager case
  local prefix=$1; shift
  for t in test_images_match_the_reference test_transformer_output_matches_bf16 \
           test_images_lpips_vs_reference test_clip_score_vs_reference; do
    ids "tests/test_quality.py::$t" "$prefix" eager-b1-cuda "$@"
  done
}
e2e() {  # e2e PREFIX VARIANT SCHEME... -> image latency, its speedup over bf16 eager, peak memory
  local prefix=$1 variant=$2; shift 2
  ids tests/test_end_to_end.py::test_prompt_to_image "$prefix" "$variant-b1-cuda" "$@"
  ids tests/test_end_to_end.py::test_end_to_end_speedup "$prefix" "$variant-b1-cuda-bf16" "$@"
  ids tests/test_end_to_end.py::test_end_to_end_peak_memory "$prefix" "$variant-b1-cuda" "$@"
}
forward() {  # forward PREFIX BATCH CASE... -> transformer forward timing and its speedup over bf16 eager
  local prefix=$1 batch=$2; shift 2
  ids tests/test_performance.py::test_transformer_forward "$prefix" "b$batch-cuda" bf16-eager "$@"
  ids tests/test_performance.py::test_transformer_speedup "$prefix" "b$batch-cuda-bf16" "$@"
}
session() {  # session GPU NAME ARGS... -> one bounded reference run on one GPU, in the background
  local gpu=$1 name=$2; shift 2
  CUDA_VISIBLE_DEVICES=$gpu timeout -s INT -k 30 "$bound" tools/reference-run.sh "$out/$name" \
    --quantgate-source synthetic --quantgate-calibration-samples "${CALIBRATION_SAMPLES:-8}" \
    --quantgate-quality-prompts 2 --quantgate-case-timeout "${CASE_TIMEOUT_S:-300}" -rs "$@" \
    > "$out/$name.console" 2>&1 &
}
