"""Shared fixtures: tiny random-initialised models built from configs (no downloads), seeded."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import transformers

# The benchmark scripts import their helpers as ``from _common import ...`` (``python benchmarks/X.py`` puts
# their folder on sys.path); tests that import a script (``import headline_table``) get the same path, set here.
BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.append(str(BENCHMARKS))


def one_error_line(err: str, start: str = "error: ", skip: tuple[str, ...] = ()) -> str:
    """The one line of ``err`` (blank lines and lines starting with ``skip``, e.g. progress, aside): bad input's
    contract is one clear line starting with ``start``, no traceback."""
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(skip)]
    assert len(lines) == 1, f"expected one error line, got:\n{err}"
    assert "Traceback" not in err and lines[0].startswith(start), lines[0]
    return lines[0]

ARCHS = ("llama", "qwen2")
KVZIP_PROMPT = (7, 8, 9)  # a repeat prompt for KVzip-style scorers on tiny models (no tokenizer)


def context_ids(n: int, seed: int = 0) -> torch.Tensor:
    """[1, n] random token ids of a tiny model's vocabulary (seeded)."""
    return torch.randint(5, 250, (1, n), generator=torch.Generator().manual_seed(seed))


# options a scorer needs on tiny models that have no tokenizer (KVzip's repeat prompt, as token ids)
SCORER_OPTIONS: dict[str, dict] = {"kvzip": {"prompt_ids": KVZIP_PROMPT, "replay_chunk": 40},
                                   "kvzip_v": {"prompt_ids": KVZIP_PROMPT, "replay_chunk": 40},
                                   "kvzip_vc": {"prompt_ids": KVZIP_PROMPT, "replay_chunk": 40}}
IMPLS = ("sdpa", "eager")


def build_tiny(arch: str, impl: str = "sdpa", n_layers: int = 4, seed: int = 0) -> torch.nn.Module:
    """A 4-layer GQA model (4 query heads, 2 KV heads, head_dim 16) in float32."""
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, max_position_embeddings=4096)
    if arch == "llama":
        cfg = transformers.LlamaConfig(**common)
        cls = transformers.LlamaForCausalLM
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(**common)
        cls = transformers.Qwen2ForCausalLM
    else:
        raise ValueError(arch)
    cfg._attn_implementation = impl
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    # larger random weights make attention peaky, so that eviction visibly changes outputs
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    return model


@pytest.fixture(scope="session", autouse=True)
def private_sample_cache(tmp_path_factory):
    """Generated samples are cached in a folder of this test session, not in the user's cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("DEPTHKV_SAMPLE_CACHE", str(tmp_path_factory.mktemp("sample_cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def tiny_models():
    cache: dict = {}

    def get(arch: str = "llama", impl: str = "sdpa", n_layers: int = 4):
        key = (arch, impl, n_layers)
        if key not in cache:
            cache[key] = build_tiny(arch, impl, n_layers)
        return cache[key]

    return get


@pytest.fixture
def prompt_ids():
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (1, 96), generator=gen)


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def trained_bpe_tokenizer():
    """A small byte-level BPE trained on the calibration corpus (400 ids) with a chat template; no download."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from depthkv.tasks import corpus

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([p.text for p in corpus.prose_passages("calib")[:60]], trainer)
    t = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>")
    t.chat_template = CHAT_TEMPLATE
    return t


def tiny_loaded_model(tokenizer):
    """A LoadedModel around a tiny random 4-layer Llama and ``tokenizer``."""
    from depthkv.models import LoadedModel, tiny_model

    model = tiny_model("llama", n_layers=4, seed=0, attn_implementation="sdpa")
    return LoadedModel(model=model, tokenizer=tokenizer, name="tiny-llama", source="local", load_seconds=0.0,
                       converted=False)


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    """A folder holding a tiny random 4-layer Llama and a trained BPE tokenizer: a model ``--model`` can load
    by path (no downloads)."""
    from depthkv.models import tiny_model

    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", n_layers=4, seed=0, attn_implementation="sdpa").save_pretrained(folder)
    trained_bpe_tokenizer().save_pretrained(folder)
    return folder


def tiny_kvzip_profile(model_dir: Path, path: Path) -> Path:
    """A schema-valid agnostic KVzip profile for the tiny model saved in ``model_dir`` (layer 1 the sensitive
    one), written to ``path``."""
    from depthkv.allocation.profile import KIND, SCHEMA_VERSION
    from depthkv.models import load_model, model_identity

    lm = load_model(str(model_dir), dtype="float32", device="cpu")
    mean = [[0.01, 0.03], [0.4, 0.9], [0.02, 0.05], [0.05, 0.1]]
    data = {
        "schema_version": SCHEMA_VERSION, "kind": KIND, "model": model_identity(lm.model, lm.name),
        "setting": "agnostic", "probe_ratios": [0.5, 1.0], "scorer": {"name": "kvzip", "options": {}},
        "protection": {"n_sink": 4, "n_recent": 16}, "curves": {"kl": {"mean": mean, "lo": mean, "hi": mean}},
        "data": {"description": "hand-made", "n_samples": 2, "tasks": ["needle"], "sample_ids": []},
    }
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def single_thread():
    """Tiny tensors: one thread is fastest, and immune to other processes competing for the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
