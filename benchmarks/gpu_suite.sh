#!/usr/bin/env bash
# The GPU figures, one workload per line, results as JSON in $OUT (or ./results-gpu).
# The GPU box has no network and no built-in model: carry the tokenizer files in .gpu/tokenizer
# (copied from ~/.cache/qwen3-ladder/SmolLM2-*/) and run from the repository root:
#     bash benchmarks/gpu_suite.sh
set -uo pipefail
export PYTHONPATH=. QWEN3_LADDER_TOKENIZER=${QWEN3_LADDER_TOKENIZER:-.gpu/tokenizer} PYTHONUNBUFFERED=1
export QWEN3_LADDER_CACHE=${QWEN3_LADDER_CACHE:-/tmp/qwen3-ladder}
out=${OUT:-results-gpu}; mkdir -p "$out"
run() { name=$1; shift; timeout 540 python -m benchmarks run --model qwen3-0.6b --device cuda --out "$out/$name.json" "$@" 2>&1 | grep -v -i warn | tail -4; }
run long-prompt   --workload long-prompt   --compare stage04_batching,stage05_chunked
run shared-prefix --workload shared-prefix --compare stage02_paged,stage03_radix
run random64      --workload random --requests 64 --compare stage04_batching,hf-generate
# The GPU fast path: correctness first, then where a step goes, then stage06 against transformers.
python -m benchmarks.gpu_smoke "$QWEN3_LADDER_TOKENIZER" 2>&1 | grep -v -i warn | tail -30
python -m benchmarks.teacher_forced "$QWEN3_LADDER_TOKENIZER" --out "$out/teacher-forced-bf16.json" 2>&1 | grep -E "^(ok|FAIL|failures)"
python -m benchmarks.gpu_out_of_memory 2>&1 | grep -E "^(ok|FAIL|info|failures)"
python -m benchmarks.teacher_forced "$QWEN3_LADDER_TOKENIZER" --plant-bug --kinds dense,moe,llama 2>&1 | grep -E "^(FAIL|failures)"
for t in 0.6 0; do python -m benchmarks.step_profile stage06_scheduling --temperature $t 2>&1 | grep '^{'; done
run random256     --workload random --compare stage06_scheduling,hf-generate
# Stage 09: graphs against eager on the same decode batches, then the speed they buy.
python -m benchmarks.gpu_graph_check "$QWEN3_LADDER_TOKENIZER" 2>&1 | grep -E "^(ok|FAIL|info|failures)"
run single-graphs --workload single --compare stage08_ep,stage09_cuda_graph,hf-generate --repeat 3
run random64-graphs --workload random --requests 64 --compare stage08_ep,stage09_cuda_graph --repeat 2
# Stage 10: the overlap schedule against stage 09 (GPU busy at 64 requests, then throughput and batch-1 latency).
for s in stage09_cuda_graph stage10_overlap; do python -m benchmarks.step_profile $s --requests 64 2>&1 | grep '^{'; done
run random64-overlap  --workload random --requests 64 --compare stage09_cuda_graph,stage10_overlap --repeat 2
run random256-overlap --workload random --compare stage09_cuda_graph,stage10_overlap --repeat 2
run single-overlap    --workload single --compare stage09_cuda_graph,stage10_overlap,hf-generate --repeat 3
