#!/usr/bin/env bash
# Tensor and expert parallelism on a 2-GPU machine (nvidia-h200-x2): tp=1 vs tp=2 on a random
# Qwen3-8B, ep=1 vs ep=2 on a cut-down Qwen3-30B-A3B, then worker faults on NCCL. Same set-up as gpu_suite.sh.
set -uo pipefail
export PYTHONPATH=. QWEN3_LADDER_TOKENIZER=${QWEN3_LADDER_TOKENIZER:-.gpu/tokenizer} PYTHONUNBUFFERED=1
export QWEN3_LADDER_CACHE=${QWEN3_LADDER_CACHE:-/tmp/qwen3-ladder}
out=${OUT:-results-gpu}; mkdir -p "$out"
kv='"kv_cache_bytes": 8589934592'  # a fixed 8 GiB pool per GPU, so memory figures compare weights
run() { name=$1; shift; timeout 240 python -m benchmarks run --device cuda --out "$out/$name.json" "$@" 2>&1 | grep -v -i warn | tail -3; }
run tp1 --model qwen3-8b --workload single --stage stage07_tp --engine-kwargs "{$kv}"
run tp2 --model qwen3-8b --workload single --stage stage07_tp --engine-kwargs "{$kv, \"tp_size\": 2}"
run ep1 --model qwen3-30b-a3b-8l --workload random --requests 16 --stage stage08_ep --engine-kwargs "{$kv}"
run ep2 --model qwen3-30b-a3b-8l --workload random --requests 16 --stage stage08_ep --engine-kwargs "{$kv, \"ep_size\": 2}"
# Worker faults on NCCL: a worker killed, raising or hanging, rank 0 out of memory, an idle engine.
for s in stage07_tp stage10_overlap; do timeout 560 python -m benchmarks.gpu_worker_faults --stage $s 2>&1 | grep -E "^(ok|FAIL|failures|[0-9]+ x)"; done
