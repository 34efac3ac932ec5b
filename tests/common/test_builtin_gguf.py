"""The built-in offline model (SmolLM2-135M-Instruct from GGUF) loads and matches transformers."""

import torch

from common.loader import builtin_gguf_path, load_model
from reference import DictCache


@torch.no_grad()
def test_logits_match_transformers_reading_the_same_gguf(builtin_folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = builtin_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(builtin_folder)
    ids = torch.tensor(tokenizer.encode("The capital of France is"))
    model, config, _ = load_model(None)
    assert config.architecture == "LlamaForCausalLM" and config.tie_word_embeddings
    ours = model.compute_logits(model(ids, torch.arange(len(ids)), DictCache()))
    torch.testing.assert_close(ours, reference(ids[None]).logits[0], atol=2e-4, rtol=1e-4)
