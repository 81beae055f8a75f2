"""The on-disk sample cache: a repeated call reads the file instead of generating, returns exactly what
generating returns, and never serves samples of other arguments, another tokenizer or other generators."""

from __future__ import annotations

import pytest

from depthkv.tasks import sample_cache
from depthkv.tasks.prompt import token_counter
from depthkv.tasks.registry import generate
from tests.conftest import trained_bpe_tokenizer


@pytest.fixture(scope="module")
def tok():
    return trained_bpe_tokenizer()


@pytest.fixture
def calls(monkeypatch, tmp_path):
    """Count the generator calls that reach ``generate``; the cache lives in this test's folder."""
    monkeypatch.setenv("DEPTHKV_SAMPLE_CACHE", str(tmp_path / "samples"))
    seen: list[tuple] = []

    def counting(task, n, seed, **kw):
        seen.append((task, n, seed))
        return generate(task, n, seed, **kw)

    monkeypatch.setattr(sample_cache, "generate", counting)
    return seen


def dicts(samples):
    return [s.to_dict() for s in samples]


@pytest.mark.parametrize("task", ["needle", "gsm_inf", "multihop"])
def test_second_call_reads_the_file_and_equals_generate(tok, calls, tmp_path, task):
    first = sample_cache.generate_cached(task, 3, 7, context_tokens=600, tokenizer=tok)
    again = sample_cache.generate_cached(task, 3, 7, context_tokens=600, tokenizer=tok)
    assert calls == [(task, 3, 7)]  # generated once, then read
    direct = generate(task, 3, 7, context_tokens=600, count_tokens=token_counter(tok))
    assert dicts(first) == dicts(again) == dicts(direct)
    assert len(list((tmp_path / "samples").glob(f"{task}-eval-*.jsonl"))) == 1


def test_other_arguments_tokenizer_or_generators_are_other_entries(tok, calls, monkeypatch):
    base = dict(context_tokens=600, tokenizer=tok)
    sample_cache.generate_cached("needle", 2, 0, **base)
    sample_cache.generate_cached("needle", 2, 1, **base)  # seed
    sample_cache.generate_cached("needle", 3, 0, **base)  # n
    sample_cache.generate_cached("needle", 2, 0, context_tokens=700, tokenizer=tok)
    sample_cache.generate_cached("needle", 2, 0, split="calib", **base)
    sample_cache.generate_cached("gsm_inf", 2, 0, num_distractors=2, **base)
    sample_cache.generate_cached("gsm_inf", 2, 0, num_distractors=3, **base)
    other_tok = trained_bpe_tokenizer()
    other_tok.add_tokens(["haystack"])  # another vocabulary: another fingerprint
    sample_cache.generate_cached("needle", 2, 0, context_tokens=600, tokenizer=other_tok)
    assert len(calls) == 8
    monkeypatch.setattr(sample_cache, "_generators_fingerprint", lambda: "edited-generators")
    sample_cache.generate_cached("needle", 2, 0, **base)
    assert len(calls) == 9


def test_unreadable_file_is_generated_again(tok, calls, tmp_path):
    sample_cache.generate_cached("needle", 2, 0, context_tokens=600, tokenizer=tok)
    (path,) = (tmp_path / "samples").glob("needle-*.jsonl")
    good = path.read_text()
    for broken in (good[: len(good) // 2], "not json\n", good.splitlines()[0] + "\n"):  # cut, garbage, 1 of 2
        path.write_text(broken)
        out = sample_cache.generate_cached("needle", 2, 0, context_tokens=600, tokenizer=tok)
        assert len(out) == 2 and path.read_text() == good  # regenerated and written again
    assert len(calls) == 4


def test_not_cached_when_off_or_unfingerprintable(tok, calls, tmp_path, monkeypatch):
    sample_cache.generate_cached("needle", 2, 0, context_tokens=600, tokenizer=tok, cache=False)

    class Plain:  # a tokenizer with no serialisation to fingerprint
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": text.split()}

    sample_cache.generate_cached("needle", 2, 0, context_tokens=600, tokenizer=Plain())
    monkeypatch.setenv("DEPTHKV_SAMPLE_CACHE", "off")
    assert sample_cache.sample_cache_dir() is None
    sample_cache.generate_cached("needle", 2, 0, context_tokens=600, tokenizer=tok)
    sample_cache.generate_cached("needle", 2, 0, context_tokens=600, tokenizer=tok)
    assert len(calls) == 4 and not (tmp_path / "samples").exists()
