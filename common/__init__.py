"""Pieces every stage shares: the Qwen3 model, its config, weight loading,
the tokenizer and the sampler. Nothing here knows about stages, caches or
schedulers; each stage plugs its own KV cache into the model's forward."""
