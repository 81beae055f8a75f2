"""depthkv.tasks: generators, corpus, metrics, JSONL loading and prompt construction (fast, offline)."""

from __future__ import annotations

import json
import re

import pytest

from depthkv.tasks import (
    CALIBRATION_FAMILIES,
    METRICS,
    TASKS,
    Sample,
    TaskDataError,
    build_prompt,
    calibration_mix,
    corpus,
    edit_similarity,
    exact_match,
    f1_score,
    generate,
    haystack,
    load_jsonl,
    normalise,
    number_match,
    read_samples,
    rouge,
    score,
    set_match,
    substring_match,
    write_samples,
    yap_score,
)
from depthkv.tasks._multidoc import split_documents
from depthkv.tasks.docqa import quoted
from depthkv.tasks.gsm_inf import solve

SYNTHETIC = ("needle", "multikey", "vartrack", "gsm_inf", "code_next_line", "summarise", "multihop", "docqa")
CTX = 600  # small contexts keep the suite fast


def words(text: str) -> int:
    """A simple stand-in tokenizer length: whitespace-separated words."""
    return len(text.split())


def dicts(samples):
    return [s.to_dict() for s in samples]


# ------------------------------------------------------------------------------------------ corpus


def test_corpus_is_real_varied_prose():
    text = haystack(20000, seed=1)
    assert abs(len(text) - 20000) <= 0.02 * 20000
    paras = [p for p in text.split("\n\n") if p.strip()]
    assert len(paras) > 10
    assert len(set(paras)) >= 0.95 * len(paras)  # not one repeated filler
    sentences = re.findall(r"[^.!?]+[.!?]", text)
    assert len(set(sentences)) > 50
    assert ">>>" not in text
    assert corpus.corpus_id().startswith("python-stdlib-3.")


def test_haystack_deterministic_and_seeded():
    assert haystack(3000, 5) == haystack(3000, 5)
    assert haystack(3000, 5) != haystack(3000, 6)
    assert haystack(300, 5, count_tokens=words, split="eval") == haystack(
        300, 5, count_tokens=words, split="eval"
    )
    n = words(haystack(300, 5, count_tokens=words))
    assert 0.95 * 300 <= n <= 1.05 * 300


def test_corpus_halves_are_disjoint():
    cal = {p.source for p in corpus.prose_passages("calib")}
    ev = {p.source for p in corpus.prose_passages("eval")}
    assert cal and ev and not cal & ev
    assert not set(corpus.key_words("calib")) & set(corpus.key_words("eval"))
    cal_files = {p for p, _ in corpus.python_sources("calib")}
    ev_files = {p for p, _ in corpus.python_sources("eval")}
    assert cal_files and ev_files and not cal_files & ev_files
    assert corpus.split_of("doc:json/__init__.py") == corpus.split_of("doc:json/__init__.py")
    with pytest.raises(ValueError):
        corpus.prose_passages("train")


def test_truncate_to_word_and_front():
    text = "alpha beta gamma. delta epsilon. zeta"
    assert corpus.truncate_to(text, 3, words) == "alpha beta gamma."
    assert corpus.truncate_to(text, 3, words, at="sentence") == "alpha beta gamma."
    assert corpus.truncate_to(text, 4, words, at="sentence") == "alpha beta gamma."
    assert corpus.truncate_to(text, 2, words, from_front=True) == "epsilon. zeta"
    assert corpus.truncate_to(text, 100, words) == text


# -------------------------------------------------------------------------------------- generators


@pytest.mark.parametrize("task", SYNTHETIC)
def test_same_seed_same_samples_and_prefix_stable(task):
    a = generate(task, 3, 7, context_tokens=CTX)
    b = generate(task, 3, 7, context_tokens=CTX)
    assert dicts(a) == dicts(b)
    assert dicts(generate(task, 2, 7, context_tokens=CTX)) == dicts(a[:2])
    c = generate(task, 3, 8, context_tokens=CTX)
    assert [s.context for s in a] != [s.context for s in c]
    assert len({s.id for s in a + c}) == 6
    assert len({s.context for s in a}) == 3


@pytest.mark.parametrize("task", SYNTHETIC)
def test_calib_and_eval_are_disjoint(task):
    cal = generate(task, 4, 0, context_tokens=CTX, split="calib")
    ev = generate(task, 4, 0, context_tokens=CTX, split="eval")
    assert not {s.context for s in cal} & {s.context for s in ev}
    assert all(s.meta["split"] == "calib" for s in cal) and all(s.meta["split"] == "eval" for s in ev)
    if task in ("needle", "multikey"):
        assert not {s.meta["key"] for s in cal} & {s.meta["key"] for s in ev}
    if task == "code_next_line":
        assert not {s.meta["source_file"] for s in cal} & {s.meta["source_file"] for s in ev}
    if task in ("summarise", "multihop", "docqa"):
        cal_src = {x for s in cal for x in s.meta["sources"]}
        ev_src = {x for s in ev for x in s.meta["sources"]}
        assert not cal_src & ev_src
    if task in ("multihop", "docqa"):  # answers come from disjoint halves of the entity pools
        assert not {s.answer for s in cal} & {s.answer for s in ev}


@pytest.mark.parametrize("task", SYNTHETIC)
@pytest.mark.parametrize("counter", [None, words], ids=["approx4", "words"])
def test_lengths_near_target(task, counter):
    target = 400 if counter is words else 1000
    for s in generate(task, 3, 1, context_tokens=target, count_tokens=counter):
        n = counter(s.context) if counter else len(s.context) / 4
        assert abs(n - target) <= 0.05 * target, (task, n)
        assert s.meta["target_tokens"] == target


@pytest.mark.parametrize("task", SYNTHETIC)
def test_scoring_the_answer_gets_full_marks(task):
    for s in generate(task, 2, 3, context_tokens=CTX):
        ref = "The text documents Python modules and their behaviour." if task == "summarise" else None
        exact = task in ("code_next_line", "multihop", "docqa")  # metrics that penalise extra words
        out = ref or (s.answer if exact else f"Sure. {s.answer}")
        res = score(s, out, reference=ref)
        assert res[METRICS[s.metric].primary] == pytest.approx(1.0), (task, res)


def test_needle_answer_in_context_and_depth_grid():
    samples = generate("needle", 6, 0, context_tokens=500, depths=[0.0, 0.5, 1.0], lengths=[400, 800])
    assert [(s.meta["length"], s.meta["depth"]) for s in samples] == [
        (400, 0.0), (400, 0.5), (400, 1.0), (800, 0.0), (800, 0.5), (800, 1.0)
    ]  # fmt: skip
    for s in samples:
        needle = f"The special magic number for {s.meta['key']} is {s.answer}."
        assert s.context.count(needle) == 1
        assert s.context.count(s.answer) == 1
        assert re.fullmatch(r"\d{7}", s.answer)
        assert s.meta["key"] in s.question
        assert abs(s.meta["realised_depth"] - s.meta["depth"]) < 0.1
        assert abs(len(s.context) / 4 - s.meta["length"]) <= 0.05 * s.meta["length"]
    assert samples[0].context.startswith("The special magic number")
    assert samples[2].context.rstrip().endswith(f"is {samples[2].answer}.")


def test_multikey_distractors():
    for s in generate("multikey", 4, 2, context_tokens=CTX, num_keys=5):
        keys, values = s.meta["keys"], s.meta["values"]
        assert len(set(keys)) == 5 and len(set(values)) == 5
        for k, v in zip(keys, values):
            assert s.context.count(f"The special magic number for {k} is {v}.") == 1
        assert values[keys.index(s.meta["key"])] == s.answer
        assert s.meta["key"] not in s.meta["distractor_keys"] and len(s.meta["distractor_keys"]) == 4


def _resolve_vars(context: str, value: str) -> list[str]:
    """Independent solver: follow the assignments in reading order."""
    env: dict[str, str] = {}
    for name, rhs in re.findall(r"VAR ([A-Z]+) = (VAR [A-Z]+|\d+)\.", context):
        env[name] = env[rhs[4:]] if rhs.startswith("VAR ") else rhs
    return sorted(n for n, v in env.items() if v == value)


def test_vartrack_answer_derivable():
    for s in generate("vartrack", 4, 0, context_tokens=CTX, num_chains=3, num_hops=3):
        value = s.meta["value"]
        assert value in s.question
        expected = [a.strip() for a in s.answer.split(",")]
        assert len(expected) == 4
        assert _resolve_vars(s.context, value) == sorted(expected)
        assert len(s.meta["candidates"]) == 12
        assert score(s, s.answer) == {"set_match": 1.0, "set_exact": 1.0}


def test_gsm_inf_answer_recomputed_from_facts():
    formulas = {
        "more_times": lambda v: (v["x"] + v["y"]) * v["z"],
        "more_times_give": lambda v: (v["x"] + v["y"]) * v["z"] - v["r"],
        "boxes_give": lambda v: v["p"] * v["q"] - v["r"],
        "together": lambda v: 2 * v["x"] - v["y"],
        "share": lambda v: v["x"] - v["y"] * v["k"],
    }
    kinds = set()
    for s in generate("gsm_inf", 16, 4, context_tokens=CTX, num_distractors=6):
        p = s.meta["problem"]
        kinds.add(p["kind"])
        want = formulas[p["kind"]](p["values"])
        assert int(s.answer) == want == solve(p) and want > 0
        for fact in s.meta["facts"]:
            assert s.context.count(fact) == 1
            for number in re.findall(r"\d+", fact):
                assert int(number) in p["values"].values()
        assert len(s.meta["distractors"]) == 6
        for d in s.meta["distractors"]:
            assert d in s.context
            # a distractor about the problem's object never involves the problem's people
            if re.search(rf"\b{p['object']}\b", d):
                assert not any(re.search(rf"\b{n}\b", d) for n in p["names"])
        assert 2 <= s.meta["steps"] <= 3
    assert len(kinds) >= 4


def test_code_next_line_matches_source():
    files = dict(corpus.python_sources())
    for s in generate("code_next_line", 4, 0, context_tokens=CTX, count_tokens=words) + generate(
        "code_next_line", 2, 0, context_tokens=20000
    ):
        src = files[s.meta["source_file"]]
        lines = src.splitlines(keepends=True)
        line_no = s.meta["line"]
        assert lines[line_no - 1].rstrip("\n") == s.meta["answer_raw"]
        assert s.answer == s.meta["answer_raw"].strip() and s.answer
        prefix = "".join(lines[: line_no - 1])
        own = s.context[-len(prefix) :] if len(s.context) >= len(prefix) else s.context
        assert prefix.endswith(own)  # the context is (a suffix of) the file text before the line
        extra = s.meta["prepended_files"]
        if extra:  # whole other files in front (the first may be cut), then the own file from its top
            assert s.context.endswith(f"# file: {s.meta['source_file']}\n" + prefix)
            assert all(f"# file: {other}\n" in s.context for other in extra[1:])
    long = generate("code_next_line", 2, 0, context_tokens=20000)
    assert any(s.meta["prepended_files"] or len(s.context) > 70000 for s in long)


def test_summarise_text_and_reference():
    s = generate("summarise", 1, 0, context_tokens=2000)[0]
    assert s.answer == "" and s.metric == "rouge"
    docs = {d.source: d for d in corpus.documents()}
    first = docs[s.meta["sources"][0]]
    assert s.context.startswith(first.title)
    assert first.paragraphs[0][:100] in s.context
    with pytest.raises(ValueError, match="reference"):
        score(s, "some output")
    res = score(s, "the cat sat on the mat", reference="the cat sat on the mat")
    assert res["rouge1"] == res["rougeL"] == pytest.approx(1.0) and res["yap"] == 0
    assert METRICS["rouge"].primary == "rouge1"  # the paper reports ROUGE-1


_HOP1 = re.compile(r"The (\w+) of the (\w+) module is ([A-Z]\w+ [A-Z]\w+)\.")
_HOP2 = re.compile(r"([A-Z]\w+ [A-Z]\w+) lives in ([A-Z]\w+(?: [A-Z]\w+)?)\.")


def test_multihop_hops_in_different_documents_and_answer_derivable():
    for s in generate("multihop", 6, 0, context_tokens=CTX, num_distractors=3, relation_decoys=1):
        docs = split_documents(s.context)
        assert [t for t, _ in docs] == s.meta["titles"] and len(docs) == s.meta["n_docs"] >= 4
        (hop1, hop2), (a, b) = s.meta["hops"], s.meta["hop_docs"]
        assert a != b and abs(a - b) >= len(docs) // 2  # far apart
        assert hop1 in docs[a][1] and hop2 in docs[b][1]
        assert s.context.count(hop1) == 1 and s.context.count(hop2) == 1
        # independent solver over the context: (relation, module) -> person -> city, all unambiguous
        people = {(r, m): p for r, m, p in _HOP1.findall(s.context)}
        homes = dict(_HOP2.findall(s.context))
        assert len(people) == len(_HOP1.findall(s.context)) == 5 and len(homes) == 5
        assert len(set(homes.values())) == 5
        relation, module = s.meta["relation"], s.meta["module"]
        assert f"the {relation} of the {module} module" in s.question
        assert homes[people[(relation, module)]] == s.answer
        # one hop only, a wrong bridge or a wrong relation all score 0
        assert score(s, s.meta["bridge"])["f1"] == 0.0
        wrong = [d["city"] for d in s.meta["distractors"]]
        assert len(wrong) == 4 and all(score(s, c)["f1"] == 0.0 for c in wrong)
        decoys = [d for d in s.meta["distractors"] if d["module"] == module]
        assert len(decoys) == 1 and decoys[0]["relation"] != relation
        for d in s.meta["distractors"]:
            assert d["docs"][0] != d["docs"][1]
        assert s.answer not in s.meta["titles"] and s.context.count(s.answer) == 1


def test_multihop_without_distractors_and_options():
    s = generate("multihop", 1, 0, context_tokens=CTX, num_distractors=0, relation_decoys=0, num_docs=2)[0]
    assert len(_HOP1.findall(s.context)) == 1 and len(_HOP2.findall(s.context)) == 1
    assert s.meta["n_docs"] == 2 and sorted(s.meta["hop_docs"]) == [0, 1]
    with pytest.raises(ValueError, match="num_docs"):
        generate("multihop", 1, 0, context_tokens=CTX, num_docs=1)
    with pytest.raises(ValueError, match="relation_decoys"):
        generate("multihop", 1, 0, context_tokens=CTX, relation_decoys=4)
    with pytest.raises(ValueError, match="pool has only"):
        generate("multihop", 1, 0, context_tokens=CTX, num_distractors=60)


def test_docqa_answer_only_in_the_titled_document():
    kinds = set()
    for s in generate("docqa", 8, 0, context_tokens=CTX, num_distractors=3):
        kinds.add(s.meta["attribute"])
        docs = split_documents(s.context)
        assert len(docs) == s.meta["n_docs"] >= 4
        title, text = docs[s.meta["doc"]]
        assert title == s.meta["title"] and f"titled {quoted(title)}," in s.question
        assert s.context.count(s.meta["fact"]) == 1 and s.meta["fact"] in text
        assert s.context.count(s.answer) == 1 and s.answer in s.meta["fact"]
        stem = s.meta["fact"].split(s.answer)[0]  # "The review number of this document is "
        values = [s.answer] + [d["value"] for d in s.meta["distractors"]]
        assert len(set(values)) == 4
        for d in s.meta["distractors"]:
            assert d["doc"] != s.meta["doc"] and d["title"] == docs[d["doc"]][0]
            assert f"{stem}{d['value']}." in docs[d["doc"]][1] and s.context.count(d["value"]) == 1
            assert score(s, d["value"])["f1"] == 0.0  # another document's value earns nothing
        # the near-duplicate sentence is in exactly num_distractors + 1 documents, once each
        assert s.context.count(stem) == 4 and sum(stem in body for _, body in docs) == 4
        assert score(s, s.answer) == {"f1": 1.0, "em": 1.0}
    assert len(kinds) >= 3
    for s in generate("docqa", 3, 1, context_tokens=CTX, attributes=["review"]):
        assert re.fullmatch(r"\d{4}", s.answer) and "review number" in s.question


def test_docqa_options_and_corpus_limits():
    s = generate("docqa", 1, 0, context_tokens=CTX, num_docs=2, num_distractors=5)[0]
    assert s.meta["n_docs"] >= 6 and len(s.meta["distractors"]) == 5
    with pytest.raises(ValueError, match="unknown attributes"):
        generate("docqa", 1, 0, context_tokens=CTX, attributes=["colour"])
    with pytest.raises(ValueError, match="num_distractors"):
        generate("docqa", 1, 0, context_tokens=CTX, num_distractors=-1)
    with pytest.raises(ValueError, match="too small"):
        generate("docqa", 1, 0, context_tokens=10**7)
    with pytest.raises(ValueError, match="no room"):
        generate("docqa", 1, 0, context_tokens=30)
    long = generate("multihop", 1, 0, context_tokens=30000)[0]  # long contexts use more documents
    assert long.meta["n_docs"] > 4 and abs(len(long.context) / 4 - 30000) <= 0.05 * 30000


def test_generate_errors():
    with pytest.raises(KeyError, match="unknown task"):
        generate("nope", 1, 0)
    with pytest.raises(TypeError):
        generate("needle", 1, 0, depth_list=[0.5])
    with pytest.raises(ValueError, match="split"):
        generate("needle", 1, 0, split="train")
    with pytest.raises(ValueError, match="no room"):
        generate("gsm_inf", 1, 0, context_tokens=40)
    assert set(SYNTHETIC) | {"jsonl"} == set(TASKS)


def test_calibration_mix():
    mix = calibration_mix(12, 0, context_tokens=CTX)
    assert len(mix) == 12
    assert all(s.meta["split"] == "calib" for s in mix)
    counts = {f: sum(s.task == f for s in mix) for f in CALIBRATION_FAMILIES}
    assert sorted(counts.values()) == [2, 2, 2, 3, 3]
    assert [s.task for s in mix[:5]] == list(CALIBRATION_FAMILIES)
    assert dicts(mix) == dicts(calibration_mix(12, 0, context_tokens=CTX))
    assert not {s.context for s in mix} & {s.context for s in calibration_mix(12, 1, context_tokens=CTX)}


def test_sample_roundtrip(tmp_path):
    samples = generate("multikey", 2, 0, context_tokens=CTX)
    for s in samples:
        assert Sample.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    write_samples(tmp_path / "s.jsonl", samples)
    assert read_samples(tmp_path / "s.jsonl") == samples
    with pytest.raises(ValueError, match="unknown keys"):
        Sample.from_dict({**samples[0].to_dict(), "extra": 1})


# ------------------------------------------------------------------------------------------ metrics


def test_normalise_and_substring():
    assert normalise("  The Answer: 1,234,567!  ") == "answer 1234567"
    assert substring_match("The special magic number is 1,234,567.", "1234567") == 1.0
    assert substring_match("It is 12345678", "1234567") == 0.0  # whole words only
    assert substring_match("PARIS, of course", "paris") == 1.0
    assert substring_match("anything", "") == 0.0
    assert substring_match("The answer is (A).", "A") == 1.0  # an article-only answer is kept
    assert substring_match("The answer is B.", "A") == 0.0


def test_set_match_partial_and_exact():
    assert set_match("ABCDE, FGHIJ", ["ABCDE", "FGHIJ", "KLMNO", "PQRST"]) == {
        "set_match": 0.5,
        "set_exact": 0.0,
    }
    assert set_match("abcde fghij", ["ABCDE", "FGHIJ"])["set_exact"] == 1.0
    both = set_match("ABCDE FGHIJ ZZZZZ", ["ABCDE", "FGHIJ"], candidates=["ABCDE", "FGHIJ", "ZZZZZ"])
    assert both == {"set_match": 1.0, "set_exact": 0.0}
    assert set_match("ABCDEX", ["ABCDE"])["set_match"] == 0.0


def test_number_match_takes_last_integer():
    assert number_match("First 3 apples, then 5, so the answer is 42.", "42") == 1.0
    assert number_match("The answer is 42, not 41", "42") == 0.0
    assert number_match("total: 1,250", 1250) == 1.0
    assert number_match("12.0", "12") == 1.0
    assert number_match("-7", "-7") == 1.0
    assert number_match("between 3-5", "5") == 1.0
    assert number_match("It is 1,250,", "1250") == 1.0
    assert number_match("no digits", "3") == 0.0


def test_edit_similarity():
    assert edit_similarity("  return x + 1 ", "return x + 1") == 1.0
    assert edit_similarity("kitten", "sitting") == pytest.approx(1 - 3 / 7)
    assert edit_similarity("", "") == 1.0
    assert edit_similarity("abc", "") == 0.0
    s = Sample("x", "code_next_line", "", "", "return x + 1", "edit_sim")
    assert score(s, "```python\n    return x + 1\n```")["edit_sim"] == 1.0


def test_rouge_hand_computed():
    r = rouge("the cat lay on the mat", "the cat sat on the mat")
    # unigrams: 5 of 6 shared both ways; bigrams: the-cat, on-the, the-mat = 3 of 5; LCS = 5 of 6
    assert r["rouge1"] == pytest.approx(5 / 6)
    assert r["rouge2"] == pytest.approx(3 / 5)
    assert r["rougeL"] == pytest.approx(5 / 6)
    r = rouge("cat", "the cat sat")  # P = 1, R = 1/3 -> F = 0.5
    assert r["rouge1"] == pytest.approx(0.5) and r["rouge2"] == 0.0


def test_yap_score():
    assert yap_score("one two three four five", 3) == 2
    assert yap_score("one two", 3) == 0
    assert yap_score(10, 4) == 6
    assert yap_score("abcdef", 2, count_tokens=len) == 4


def test_exact_match_squad_normalisation():
    assert exact_match("The Tampere.", "tampere") == 1.0  # case, article, punctuation
    assert exact_match("  Buenos   Aires! ", "Buenos Aires") == 1.0
    assert exact_match("1,234", "1234") == 1.0
    assert exact_match("It is Tampere", "Tampere") == 0.0  # extra words count
    assert exact_match("Marten Ilse", "Ilse Marten") == 0.0
    assert exact_match("", "") == 1.0


def test_f1_partial_credit():
    assert f1_score("Ilse", "Ilse Marten") == pytest.approx(2 / 3)  # P = 1, R = 1/2
    assert f1_score("the city is Tampere", "Tampere") == pytest.approx(0.5)  # "city is tampere": P = 1/3
    assert f1_score("Marten Ilse", "Ilse Marten") == 1.0  # bag of words
    assert f1_score("tampere tampere", "tampere") == pytest.approx(2 / 3)  # overlap is a multiset
    assert f1_score("Lisbon", "Tampere") == 0.0
    assert f1_score("", "Tampere") == 0.0 and f1_score("the", "") == 1.0  # both normalise to nothing
    s = Sample("x", "multihop", "", "", "Buenos Aires", "f1")
    assert score(s, "Buenos Aires, Argentina") == {"f1": pytest.approx(0.8), "em": 0.0}
    assert METRICS["f1"].primary == "f1" and METRICS["em"].primary == "em"
    aliased = Sample("y", "jsonl", "", "", "New York City", "em", meta={"aliases": ["NYC"]})
    assert score(aliased, "nyc") == {"f1": 1.0, "em": 1.0}  # best over the gold answers
    with pytest.raises(ValueError, match="aliases"):
        score(Sample("z", "jsonl", "", "", "a", "f1", meta={"aliases": "NYC"}), "a")


# -------------------------------------------------------------------------------------------- jsonl


def _write(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_jsonl_loads_rows(tmp_path):
    p = _write(
        tmp_path / "data.jsonl",
        [
            {"context": "Alice lives in Paris.", "question": "Where does Alice live?", "answer": "Paris"},
            "",
            {"context": "x", "question": "q", "answer": ["A", "B"], "metric": "set_match", "id": "r2"},
            {"context": "y", "question": "q", "answer": "z", "split": "calib"},
        ],
    )
    rows = generate("jsonl", None, 0, path=p)
    assert [r.id for r in rows] == ["data:1", "r2"]  # the calib row is left out of eval
    assert rows[0].metric == "substring" and rows[1].answer == "A, B"
    assert score(rows[0], "She lives in paris.")["substring"] == 1.0
    assert len(generate("jsonl", 1, 0, path=p)) == 1
    assert [r.id for r in generate("jsonl", None, 0, path=p, split="calib")] == ["data:1", "r2", "data:4"]


@pytest.mark.parametrize(
    "bad, message",
    [
        ("{not json", "invalid JSON"),
        ({"context": "c", "question": "q"}, "missing required"),
        ({"context": "c", "question": "q", "answer": 3}, "'answer' must be a string"),
        ({"context": "c", "question": "q", "answer": "a", "metric": "bleu"}, "unknown metric"),
        ({"context": "c", "question": "q", "answer": "a", "colour": 1}, "unknown key"),
        ([1, 2], "JSON object"),
    ],
)
def test_jsonl_bad_row_names_line(tmp_path, bad, message):
    good = {"context": "c", "question": "q", "answer": "a"}
    p = _write(tmp_path / "bad.jsonl", [good, good, bad])
    with pytest.raises(TaskDataError, match=rf"bad\.jsonl:3: .*{message}"):
        load_jsonl(p)


def test_jsonl_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        generate("jsonl", None, 0, path=tmp_path / "none.jsonl")
    with pytest.raises(TypeError, match="path"):
        generate("jsonl", None, 0)


# ------------------------------------------------------------------------------------------- prompt

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_tokenizer():
    """A byte-level BPE trained in-process on corpus text (no download), with a BOS post-processor."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([p.text for p in corpus.prose_passages("calib")[:100]], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>")


def _chat(tok):
    import copy

    t = copy.deepcopy(tok)
    t.chat_template = CHAT_TEMPLATE
    return t


def test_build_prompt_chat_template_split(tiny_tokenizer):
    tok = _chat(tiny_tokenizer)
    s = generate("needle", 1, 0, context_tokens=300)[0]
    full = tok.apply_chat_template(
        [{"role": "user", "content": f"{s.context}\n\n{s.question}"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    full_ids = tok(full, add_special_tokens=False)["input_ids"]
    ctx, q = build_prompt(tok, s, question_in_prefill=False)
    assert ctx + q == full_ids
    assert s.context[-30:] in tok.decode(ctx) and s.question not in tok.decode(ctx)
    assert tok.decode(q).startswith(s.question[:5]) or s.question[:10] in tok.decode(q)
    assert tok.decode(q).endswith("<|im_start|>assistant\n")
    ctx2, q2 = build_prompt(tok, s, question_in_prefill=True)
    assert ctx2 + q2 == full_ids
    assert s.question in tok.decode(ctx2)
    assert tok.decode(q2) == "<|im_end|>\n<|im_start|>assistant\n"


def test_build_prompt_plain_and_length_counter(tiny_tokenizer):
    from depthkv.tasks import token_counter

    count = token_counter(tiny_tokenizer)
    samples = generate("gsm_inf", 2, 0, context_tokens=500, count_tokens=count)
    for s in samples:
        assert abs(count(s.context) - 500) <= 25
        ctx, q = build_prompt(tiny_tokenizer, s, question_in_prefill=False)
        assert ctx[0] == tiny_tokenizer.bos_token_id
        text = f"Context:\n{s.context}\n\nQuestion: {s.question}\nAnswer:"
        assert (
            ctx + q
            == [tiny_tokenizer.bos_token_id] + tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
        )
        assert tiny_tokenizer.decode(q).strip().startswith("Question:")
        assert tiny_tokenizer.decode(q).endswith("Answer:")
        ctx2, q2 = build_prompt(tiny_tokenizer, s)
        assert ctx2 + q2 == ctx + q and tiny_tokenizer.decode(q2).strip() == "Answer:"


@pytest.mark.parametrize("task", SYNTHETIC)
def test_prompt_fits_token_budget(tiny_tokenizer, task):
    from depthkv.tasks import token_counter

    count = token_counter(tiny_tokenizer)
    target = 400
    for s in generate(task, 2, 5, context_tokens=target, count_tokens=count):
        assert abs(count(s.context) - target) <= 0.05 * target, (task, count(s.context))
        ctx, q = build_prompt(tiny_tokenizer, s)
        # the whole prompt: the context, the question and the plain template's few tokens
        assert len(ctx) + len(q) <= 1.05 * target + count(s.question) + 12
