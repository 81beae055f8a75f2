"""KeyDiff scores and KVzip's key-distinctiveness blend (tiny models, no downloads; the press end to end is in
test_consensus.py); benchmarks/fact_auc.py."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
import torch

from depthkv.allocation import BudgetSpec
from depthkv.engine import Protection, score_prefill
from depthkv.scorers import QUERY_AGNOSTIC, KVzip, ScoreInputs, get_scorer
from depthkv.scorers.keydiff import key_distinctiveness
from depthkv.scorers.kvzip_value import value_reorder
from depthkv.scorers.reorder import blend_reorder
from tests.conftest import KVZIP_PROMPT as PROMPT
from tests.conftest import context_ids as _ids
from tests.conftest import one_error_line


def test_keydiff_is_minus_the_cosine_to_the_mean_unit_key_of_each_head():
    keys = torch.tensor([[[[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]],  # head 0: two keys along x, one along y
                          [[1.0, 1.0], [-1.0, 1.0], [1.0, 1.0]]]])
    got = key_distinctiveness(keys)
    anchor0 = torch.tensor([2 / 3, 1 / 3]) / torch.tensor([2 / 3, 1 / 3]).norm()
    want0 = -torch.tensor([anchor0[0], anchor0[0], anchor0[1]])
    torch.testing.assert_close(got[0, 0], want0)
    assert got[0, 1, 1] > got[0, 1, 0] == got[0, 1, 2]  # the odd one out ranks first
    # the scale of a key does not matter, only its direction
    torch.testing.assert_close(key_distinctiveness(keys * torch.tensor([[[[5.0], [0.1], [2.0]]]])), got)


def test_keydiff_scores_the_keys_of_each_kv_head_and_ignores_the_queries():
    g = torch.Generator().manual_seed(0)
    key, value = torch.randn(2, 2, 9, 8, generator=g), torch.randn(2, 2, 9, 8, generator=g)
    x = ScoreInputs(query=torch.randn(2, 4, 3, 8, generator=g), key=key, value=value,
                    positions=torch.arange(9).expand(2, 2, 9), scaling=8 ** -0.5, layer_idx=0)
    scorer = get_scorer("keydiff")
    out = scorer.score(x)
    assert out.shape == (2, 2, 9) and "keydiff" in QUERY_AGNOSTIC
    assert torch.equal(out, scorer.score(ScoreInputs(query=torch.zeros(2, 4, 3, 8), key=key, value=value,
                                                     positions=x.positions, scaling=x.scaling, layer_idx=0)))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("name", ["kvzip", "kvzip_vc"])
def test_diversity_reorders_each_head_by_its_keys_distinctiveness(tiny_models, arch, name):
    """Each layer and head keeps its scores (so the budgets), re-ordered by ``rank + w * rank(keydiff)``; for
    ``kvzip_vc`` after its value-norm blend. Both share one replay with the plain scorer."""
    model = tiny_models(arch)
    n = 96
    plain = get_scorer(name, prompt_ids=PROMPT, replay_chunk=40)
    blended = get_scorer(name, prompt_ids=PROMPT, replay_chunk=40, diversity=0.7)
    assert blended.whole_context and plain.replay_key() == blended.replay_key()
    sp = score_prefill(model, _ids(n), [plain], Protection(2, 4))
    again = sp.rescored(model, _ids(n), blended)
    assert again.context_pass.forwards == 0  # the replay is shared
    a, b = sp.scores[name], again.scores[name]
    moved = 0
    for layer, sa, sb in zip(sp.cache.layers, a, b, strict=True):
        assert torch.equal(sb, blend_reorder(sa, key_distinctiveness(layer.keys[..., :n, :]), 0.7))
        moved += int((sa.argsort(-1, descending=True)[..., :20] != sb.argsort(-1, descending=True)[..., :20]).sum())
    assert moved > 0
    for strategy in ("uniform", "global"):  # the budgets do not move
        spec = BudgetSpec(0.7, strategy, None, (), 6)
        assert spec.for_context(4, n, scores=a).tokens == spec.for_context(4, n, scores=b).tokens


def test_kvzip_v_blends_values_first_then_keys(tiny_models):
    model = tiny_models("llama")
    n = 80
    raw = score_prefill(model, _ids(n), [KVzip(prompt_ids=PROMPT, replay_chunk=40)], Protection(2, 4))
    both = get_scorer("kvzip_v", prompt_ids=PROMPT, replay_chunk=40, value_weight=0.5, diversity=2.0)
    got = raw.rescored(model, _ids(n), both).scores["kvzip_v"]
    for layer, s, g in zip(raw.cache.layers, raw.scores["kvzip"], got, strict=True):
        want = blend_reorder(value_reorder(s, layer.values[..., :n, :], 0.5), key_distinctiveness(layer.keys[..., :n, :]), 2.0)
        assert torch.equal(g, want)


@pytest.fixture(scope="module")
def bench():
    return importlib.import_module("fact_auc")


def test_auc_is_the_share_of_fact_other_pairs_ranked_right(bench):
    fact = np.array([True, False, True, False, False])
    scores = np.array([[5.0, 1.0, 4.0, 2.0, 3.0],  # both facts above all others
                       [1.0, 5.0, 2.0, 4.0, 3.0],  # both below
                       [3.0, 3.0, 3.0, 3.0, 3.0],  # all tied: chance
                       [4.0, 5.0, 1.0, 2.0, 3.0]])  # fact 4.0 beats 2 of the 3 others, fact 1.0 none
    np.testing.assert_allclose(bench.head_auc(scores, fact), [1.0, 0.0, 0.5, 2 / 6])
    with pytest.raises(ValueError, match="fact tokens and other tokens"):
        bench.head_auc(scores, np.ones(5, dtype=bool))


@pytest.mark.parametrize("bad, words", [
    (["--tasks", "docqa"], "tasks whose facts are known"),
    (["--scorers", "nosuch"], "unknown scorer(s) nosuch"),
    (["--scorers", "keydiff,keydiff"], "listed twice"),
    (["--samples", "0"], "--samples must be >= 1"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(bench, tmp_path, capsys, bad, words):
    out = tmp_path / "auc.json"
    assert bench.main([*bad, "--out", str(out)]) == 2
    assert words in one_error_line(capsys.readouterr().err, start="fact_auc.py: error:")
    assert list(tmp_path.iterdir()) == []


def test_end_to_end_on_a_tiny_model(bench, tiny_llama_dir, tmp_path, capsys, single_thread):
    out = tmp_path / "auc.json"
    argv = ["--model", str(tiny_llama_dir), "--tasks", "vartrack,needle", "--samples", "2", "--context-tokens",
            "300", "--scorers", "kvzip,keydiff,vnorm", "--out", str(out)]
    assert bench.main(argv) == 0
    assert "| vartrack | keydiff | 2 |" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["meta"]["kind"] == "depthkv-fact-auc" and len(data["meta"]["samples"]) == 4
    assert {(r["task"], r["scorer"]) for r in data["rows"]} == {(t, s) for t in ("vartrack", "needle")
                                                              for s in ("kvzip", "keydiff", "vnorm")}
    for r in data["rows"]:
        assert 0 <= r["auc_mean"] <= 1 and 0 <= r["heads_above_0.7"] <= 1 and len(r["auc_per_layer"]) == 4
        per = [s[r["scorer"]] for s in data["meta"]["samples"] if s["task"] == r["task"]]
        assert r["auc_mean"] == pytest.approx(sum(per) / 2, abs=1e-4)
