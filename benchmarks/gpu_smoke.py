"""CUDA smoke test of the engine (the GPU machine runs an older transformers/torch than CI).

    python benchmarks/gpu_smoke.py
Checks on a random Llama-shaped model in bf16 on the GPU: ratio 0 reproduces full-cache greedy decoding for
every scorer in both modes, and per-layer budgets physically shrink the cache.
"""

from __future__ import annotations

import torch
import transformers

import depthkv
from depthkv.allocation import Budgets
from depthkv.engine import generate_from_cache, layer_lengths
from depthkv.engine.runner import forward_with_cache, new_cache
from depthkv.scorers import SCORERS


def chunked_reference(model, ids, chunk, gen):
    """Plain chunked prefill with no pruning at all, then greedy decoding: the reference of chunked mode.

    In bf16 a chunked prefill is not bit-identical to a one-shot prefill (other matmul shapes, other
    reduction orders), so ratio 0 in chunked mode is compared with chunking alone.
    """
    cache = new_cache(model)
    for s in range(0, ids.shape[1] - 1, chunk):
        forward_with_cache(model, ids[:, s : min(s + chunk, ids.shape[1] - 1)], cache)
    return generate_from_cache(model, cache, ids, **gen)


def main() -> None:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    print("torch", torch.__version__, "transformers", transformers.__version__, "device", dev)
    torch.manual_seed(0)
    for impl in ("sdpa", "eager"):
        cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=6,
                                       num_attention_heads=8, num_key_value_heads=2, vocab_size=1000,
                                       max_position_embeddings=8192, attn_implementation=impl)
        model = transformers.LlamaForCausalLM(cfg).to(dev, torch.bfloat16).eval()
        ids = torch.randint(0, 1000, (1, 700), device=dev)
        gen = dict(max_new_tokens=12, do_sample=False)
        refs = {"post": model.generate(ids, **gen), "chunked": chunked_reference(model, ids, 256, gen)}
        for mode in ("post", "chunked"):
            for sc in SCORERS:
                with depthkv.press(model, sc, ratio=0.0, mode=mode, chunk_size=256):
                    out = model.generate(ids, **gen)
                assert torch.equal(out, refs[mode]), (impl, mode, sc)
        same = torch.equal(refs["post"], refs["chunked"])
        print(impl, "chunked prefill without pruning equals one-shot prefill:", same)
        budgets = Budgets((699, 40, 300, 21, 500, 100), context_len=699)
        with depthkv.press(model, "h2o", budgets=budgets) as p:
            comp = p.compress(ids[:, :-1])
            p.answer(comp, ids[:, -1:], **gen)
        assert layer_lengths(comp.cache) == list(budgets.tokens)
        print(impl, "ok: ratio 0 identical for", len(SCORERS), "scorers x 2 modes; lengths", layer_lengths(comp.cache))


if __name__ == "__main__":
    main()
