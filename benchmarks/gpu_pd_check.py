"""Stage 18's handover on a GPU: the K/V leaves the prefill engine through pinned memory on a side
stream and enters the decode engine the same way; the tokens must be stage 17's.

    python -m benchmarks.gpu_pd_check --model qwen3-0.6b

Both engines and stage 17 run in this process, in float32 (the same kernels for every batch
shape, so greedy tokens compare exactly); prints one line per check and ``failures: N``.
"""

import argparse
import random
import socket
import sys
import time

import torch

from benchmarks.__main__ import resolve_model
from common.config import ModelConfig
from stage17_hicache import Engine as Stage17
from stage18_pd_disaggregation import Engine, SamplingParams


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_pd_check")
    parser.add_argument("--model", default="qwen3-0.6b")
    parser.add_argument("--requests", type=int, default=12)
    args = parser.parse_args(argv)
    model_path, folder = resolve_model(args.model, "cuda")
    vocab = ModelConfig.from_file(folder).vocab_size
    rng = random.Random(0)
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(8, 600))] for _ in range(args.requests)]
    params = [SamplingParams(max_tokens=rng.randint(1, 24), temperature=0, ignore_eos=True) for _ in prompts]
    common = dict(model_path=model_path, device="cuda", dtype="float32", kv_cache_bytes=2 << 30)
    with Stage17(**common) as alone:
        expected = [alone.generate(p, s).token_ids for p, s in zip(prompts, params)]
    port = free_port()
    prefill = Engine(**common, disaggregation_mode="prefill", disaggregation_bootstrap_port=port)
    decode = Engine(**common, disaggregation_mode="decode")
    failures = 0
    try:
        ids = []
        for room, (prompt, p) in enumerate(zip(prompts, params), start=1):
            boot = dict(bootstrap_host="127.0.0.1", bootstrap_port=port, bootstrap_room=room)
            ids.append((prefill.add_request(prompt, p, **boot), decode.add_request(prompt, p, **boot)))
        outputs, start = {}, time.monotonic()
        while len(outputs) < len(ids) and time.monotonic() - start < 120:
            prefill.step()
            decode.step()
            for i, (p_id, d_id) in enumerate(ids):
                if i not in outputs and (out := decode.get_output(d_id)) is not None:
                    outputs[i] = out
        got = [outputs[i].token_ids if i in outputs else None for i in range(len(ids))]
        same = sum(g == e for g, e in zip(got, expected))
        failures += same != len(ids)
        stats = decode.stats()
        print(f"{'ok  ' if same == len(ids) else 'FAIL'} {same}/{len(ids)} requests token-identical to stage 17 "
              f"(float32, CUDA); side-stream copies: prefill {prefill.pd.copy_stream is not None}, decode "
              f"{decode.pd.copy_stream is not None}; {stats['kv_transfer_bytes'] / 1e6:.0f} MB handed over at "
              f"{stats['kv_transfer_bytes'] / max(stats['kv_transfer_seconds'], 1e-9) / 1e9:.2f} GB/s")
        held = torch.cuda.memory_allocated() / 2**20
        print(f"info decode engine: {stats['handovers_done']} handovers done, {stats['handovers_failed']} failed; "
              f"{held:.0f} MiB allocated on the GPU")
    finally:
        prefill.shutdown()
        decode.shutdown()
    print(f"failures: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
