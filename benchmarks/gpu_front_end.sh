#!/usr/bin/env bash
# Issue 45 on a GPU: the random 256-request workload in process and through the server, side by side in
# one call, with py-spy sampling the server's two processes while the served workload runs; then the
# front end alone (benchmarks/front_end.py: a scripted engine at an H100's step time). JSON in $OUT.
# Carry .gpu/tokenizer (the built-in model's tokenizer files) and the server's wheels (.whl), then:
#     CLIENTS=4 SPY=0 bash benchmarks/gpu_front_end.sh stage15_lora stage16_data_parallel
# (the in-process run is of the last stage; CLIENTS: client processes; SPY=0: no py-spy samples;
# FRONT_END=0: no scripted-engine runs)
set -uo pipefail
export PYTHONPATH=.:${PYTHONPATH:-} QWEN3_LADDER_TOKENIZER=${QWEN3_LADDER_TOKENIZER:-.gpu/tokenizer} PYTHONUNBUFFERED=1
export QWEN3_LADDER_CACHE=${QWEN3_LADDER_CACHE:-/tmp/qwen3-ladder}
out=${OUT:-results-gpu}; mkdir -p "$out"
healthy() { python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:30123/health', timeout=1)" 2>/dev/null; }
last=${!#}
timeout 200 python -m benchmarks run --model qwen3-0.6b --device cuda --workload random --stage "$last" \
    --out "$out/in-process-$last.json" 2>&1 | grep -v -i warn | tail -2
for stage in "$@"; do
    [ "${SPY:-1}" = 1 ] && ( # once the server answers: 4 s for the workload to get under way, then 6 s of samples of both processes
        for _ in $(seq 1 200); do healthy && break; sleep 1; done
        sleep 4
        # The engine process is forked by the front end's multiprocessing forkserver (common/processes.py).
        front=$(pgrep -f "$stage --serve" | head -1); engine=$(pgrep -P "$(pgrep -P "$front" -f forkserver | head -1)" | head -1)
        timeout 15 py-spy record -p "$front" -d 6 -r 100 -f raw -o "$out/spy-front-$stage.txt" --nonblocking >/dev/null 2>&1 &
        timeout 15 py-spy record -p "$engine" -d 6 -r 100 -f raw -o "$out/spy-engine-$stage.txt" --nonblocking >/dev/null 2>&1
        wait
    ) &
    spy=$!; [ "${SPY:-1}" = 1 ] || spy=""
    timeout 240 python -m benchmarks.serving --model qwen3-0.6b --device cuda --workload random --stage "$stage" \
        --client-processes "${CLIENTS:-1}" --out "$out/served-$stage.json" 2>&1 | grep -v -i warn | tail -17
    [ -n "$spy" ] && { kill "$spy" 2>/dev/null; wait "$spy" 2>/dev/null; }
done
[ "${FRONT_END:-1}" = 1 ] && for stage in "$@"; do
    timeout 60 python -m benchmarks.front_end --stage "$stage" --requests 256 --max-tokens 300 \
        --out "$out/front-end-$stage.json" 2>&1 | grep -E '"(tokens_per_s|ideal_tokens_per_s|ttft_median_ms|front_end_cpu)'
done
