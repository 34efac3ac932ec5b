#!/usr/bin/env bash
# Pipeline against tensor parallelism on a 2-GPU machine (nvidia-h200-x2 or -h100-x2; not run yet: none
# was lent when stage 19 was built). A random Qwen3-8B: one GPU, tp 2, pp 2, on a prefill-heavy
# workload (long-prompt) and a decode-heavy one (random), side by side. Same set-up as gpu_parallel.sh.
set -uo pipefail
export PYTHONPATH=. QWEN3_LADDER_TOKENIZER=${QWEN3_LADDER_TOKENIZER:-.gpu/tokenizer} PYTHONUNBUFFERED=1
export QWEN3_LADDER_CACHE=${QWEN3_LADDER_CACHE:-/tmp/qwen3-ladder}
out=${OUT:-results-gpu}; mkdir -p "$out"
kv='"kv_cache_bytes": 8589934592'  # a fixed 8 GiB pool per GPU, so memory figures compare weights
systems="stage19_pipeline_parallel,stage19_pipeline_parallel@tp_size=2,stage19_pipeline_parallel@pp_size=2"
for workload in long-prompt random; do
  timeout 560 python -m benchmarks run --device cuda --model qwen3-8b --workload $workload --compare "$systems" \
      --engine-kwargs "{$kv}" --out "$out/pp-vs-tp-$workload.json" 2>&1 | grep -v -i warn | tail -5
done
