"""benchmarks/keep_rates.py: the facts a task inserted are found in its context, and tokens are marked by overlap."""

from __future__ import annotations

import keep_rates as kr
import pytest

from depthkv.tasks.registry import generate


def test_vartrack_facts_are_its_statements():
    (s,) = generate("vartrack", 1, 0, context_tokens=600, split="calib")
    spans = kr.fact_spans("vartrack", s.context, s.meta)
    assert len(spans) == s.meta["num_chains"] * (s.meta["num_hops"] + 1)
    texts = [s.context[a:b] for a, b in spans]
    assert f"VAR {s.meta['chains'][0]['vars'][0]} = {s.meta['value']}." in texts


@pytest.mark.parametrize("task", ["needle", "multikey"])
def test_needle_facts_are_the_inserted_sentences(task):
    (s,) = generate(task, 1, 0, context_tokens=600, split="calib")
    spans = kr.fact_spans(task, s.context, s.meta)
    assert spans and all(s.context[a:b].strip().endswith(".") for a, b in spans)
    if task == "needle":
        assert [s.context[a:b] for a, b in spans] == [s.meta["needle"]]
    else:
        assert all(any(k in s.context[a:b] for a, b in spans) for k in s.meta["keys"])


def test_token_mask_marks_overlapping_tokens_only():
    offsets = [(0, 3), (3, 5), (5, 9), (9, 12)]
    assert kr.token_mask(offsets, [(4, 6)]) == [False, True, True, False]
    assert kr.token_mask(offsets, []) == [False] * 4


def test_unknown_task_is_a_clear_error():
    with pytest.raises(ValueError, match="no facts known for task 'docqa'"):
        kr.fact_spans("docqa", "text", {})
