"""Calibration: single-layer ablations, the profile file and its binding to one model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from depthkv.allocation.profile import KIND, SCHEMA_VERSION, Profile, ProfileError
from depthkv.calibration.ablation import CalibrationItem, measure_sensitivity, probe_budget, shared_cache
from depthkv.engine import Protection
from depthkv.engine.runner import forward_with_cache, score_prefill
from depthkv.engine.session import Session, prune_layer
from depthkv.models.identity import model_identity
from depthkv.scorers import get_scorer

PROT = Protection(n_sink=2, n_recent=4)


def _items(n: int = 3, length: int = 80, seed: int = 0) -> list[CalibrationItem]:
    gen = torch.Generator().manual_seed(seed)
    return [CalibrationItem(torch.randint(0, 256, (1, length), generator=gen),
                            torch.randint(0, 256, (1, 5), generator=gen), f"s{i}") for i in range(n)]


def test_ablation_shapes_determinism_and_zero_pruning(tiny_models):
    model = tiny_models("llama", "sdpa")
    items = _items()
    a = measure_sensitivity(model, items, get_scorer("h2o"), (0.001, 0.5, 1.0), PROT)
    b = measure_sensitivity(model, items, get_scorer("h2o"), (0.001, 0.5, 1.0), PROT)
    assert a.kl.shape == (3, 4, 3) and a.nll_delta.shape == (3, 4, 3)
    np.testing.assert_array_equal(a.kl, b.kl)
    # ratio 0.001 on 79 tokens keeps everything: no degradation at all
    assert probe_budget(0.001, 79, PROT) == 79
    assert np.abs(a.kl[:, :, 0]).max() < 1e-6 and np.abs(a.nll_delta[:, :, 0]).max() < 1e-5
    # window only keeps 6 tokens: this model visibly suffers somewhere
    assert probe_budget(1.0, 79, PROT) == 6
    assert a.kl[:, :, 2].max() > 1e-3
    assert (a.kl >= -1e-6).all()  # KL is non-negative


def _evicted_probe(model, item, scorer, layer_idx, budget, sp=None):
    """Reference: physically prune layer ``layer_idx`` alone, then run the whole model on the forced tokens
    (KL over the answer positions: the last T of them). ``sp``: the item's scored prefill, if already made."""
    prefix, forced = item.split()
    n_answer = item.answer_ids.shape[1]
    sp = sp or score_prefill(model, prefix, [scorer], PROT)
    cache = shared_cache(sp.cache)
    cache.layers[layer_idx] = prune_layer(sp.cache.layers[layer_idx], sp.scores[scorer.name][layer_idx],
                                          budget, PROT)[0]
    with Session(model):
        logits = forward_with_cache(model, forced, cache, logits_to_keep=forced.shape[1])[:, -n_answer:]
    ref = forward_with_cache(model, forced, shared_cache(sp.cache), logits_to_keep=forced.shape[1])[:, -n_answer:]
    logp, ref_logp = logits.float().log_softmax(-1), ref.float().log_softmax(-1)
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean().item()


@pytest.mark.parametrize("family,attn", [("llama", "sdpa"), ("qwen2", "eager")])
@pytest.mark.parametrize("batch", [1, 5])
def test_batched_masked_probes_equal_physical_eviction(tiny_models, family, attn, batch):
    """Masked, batched probes starting at the ablated layer give the KL of really evicting the tokens."""
    model = tiny_models(family, attn)
    items = _items(2)
    ratios = (0.3, 0.7, 1.0)
    res = measure_sensitivity(model, items, get_scorer("snapkv"), ratios, PROT, batch=batch)
    n = items[0].prompt_ids.shape[1] - 1
    for s, item in enumerate(items):
        for layer_idx in range(res.kl.shape[1]):
            for r_idx, ratio in enumerate(ratios):
                want = _evicted_probe(model, item, get_scorer("snapkv"), layer_idx, probe_budget(ratio, n, PROT))
                assert res.kl[s, layer_idx, r_idx] == pytest.approx(want, rel=1e-3, abs=1e-6)
    assert res.kl[:, :, -1].max() > 1e-3  # the comparison is not between zeros


def _agnostic_items(n: int = 2, length: int = 72, seed: int = 0) -> list[CalibrationItem]:
    """Context part, question part (7 tokens) and answer: the question is forced after the pruned context."""
    gen = torch.Generator().manual_seed(seed)
    return [CalibrationItem(torch.randint(0, 256, (1, length), generator=gen),
                            torch.randint(0, 256, (1, 5), generator=gen), f"s{i}",
                            torch.randint(0, 256, (1, 7), generator=gen)) for i in range(n)]


@pytest.mark.parametrize("family,attn,batch", [("llama", "sdpa", 5), ("qwen2", "eager", 3)])
def test_batched_masked_probes_equal_physical_eviction_agnostic(tiny_models, family, attn, batch):
    """Query-agnostic probes (context pruned, question + answer forced): masked batches = real eviction."""
    model = tiny_models(family, attn)
    items = _agnostic_items()
    assert items[0].context_len == 72 and items[0].split()[1].shape[1] == 7 + 5 - 1
    ratios = (0.3, 0.7, 1.0)
    res = measure_sensitivity(model, items, get_scorer("snapkv"), ratios, PROT, batch=batch)
    assert res.context_lens == [72, 72]
    scorer = get_scorer("snapkv")
    for s, item in enumerate(items):
        sp = score_prefill(model, item.split()[0], [scorer], PROT)
        for layer_idx in range(res.kl.shape[1]):
            for r_idx, ratio in enumerate(ratios):
                want = _evicted_probe(model, item, scorer, layer_idx, probe_budget(ratio, 72, PROT), sp)
                assert res.kl[s, layer_idx, r_idx] == pytest.approx(want, rel=1e-3, abs=1e-6)
    assert res.kl[:, :, -1].max() > 1e-3
    # the forced question changes what is measured: not the aware numbers of the same tokens
    aware = [CalibrationItem(torch.cat([i.prompt_ids, i.question_ids], 1), i.answer_ids) for i in items]
    res_aware = measure_sensitivity(model, aware, get_scorer("snapkv"), ratios, PROT, batch=batch)
    assert not np.allclose(res.kl, res_aware.kl, atol=1e-4)


def test_probe_ratios_are_validated(tiny_models):
    with pytest.raises(ValueError, match="probe ratios"):
        measure_sensitivity(tiny_models("llama"), _items(1), get_scorer("h2o"), (0.0, 0.5), PROT)


def _profile_for(model, name: str = "tiny") -> Profile:
    kl = np.abs(np.random.default_rng(0).normal(size=(4, 4, 2)))
    curves = {"mean": kl.mean(0).tolist(), "lo": kl.min(0).tolist(), "hi": kl.max(0).tolist()}
    return Profile({"schema_version": SCHEMA_VERSION, "kind": KIND, "model": model_identity(model, name),
                    "probe_ratios": [0.5, 1.0], "curves": {"kl": curves, "nll": curves}, "infonce_per_layer": None})


def test_profile_round_trip_and_binding(tiny_models, tmp_path):
    llama, qwen = tiny_models("llama"), tiny_models("qwen2")
    prof = _profile_for(llama)
    path = tmp_path / "p.json"
    prof.save(path)
    again = Profile.load(path, model_identity(llama, "tiny"))
    assert again.data == json.loads(path.read_text())
    np.testing.assert_allclose(again.curve(), prof.curve())
    with pytest.raises(ProfileError, match="not for"):
        Profile.load(path, model_identity(qwen, "other"))
    assert not list(tmp_path.glob(".profile-*"))  # atomic write left no temp file


@pytest.mark.parametrize("content,match", [
    ("not json", "not a JSON profile"),
    ('{"kind": "something"}', "not a depthkv profile"),
    ('{"kind": "depthkv-profile", "schema_version": 99}', "schema 99"),
    ('{"kind": "depthkv-profile", "schema_version": 1}', "lacks the field"),
])
def test_profile_load_errors(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ProfileError, match=match):
        Profile.load(path)


def test_press_rejects_profile_of_another_model(tiny_models, tmp_path):
    import depthkv

    path = tmp_path / "p.json"
    _profile_for(tiny_models("llama")).save(path)
    with pytest.raises(ProfileError):
        depthkv.press(tiny_models("qwen2"), "h2o", ratio=0.5, profile=path, strategy="optimal")
    p = depthkv.press(tiny_models("llama"), "h2o", ratio=0.5, profile=path, strategy="optimal", n_sink=2, n_recent=4)
    b = p.policy(96)
    assert b.total == round(4 * 96 * 0.5) and b.strategy == "optimal"
