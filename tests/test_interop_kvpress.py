"""depthkv.interop.kvpress: budget -> kvpress ratio conversion (always) and kvpress end to end (if installed).

kvpress 0.5.x needs transformers < 5.3, so the end-to-end tests run only in such an environment
(``bash scripts/kvpress_env.sh && .venv-kvpress/bin/python -m pytest tests/test_interop_kvpress.py``); in the
main environment they skip with the reason.
"""

from __future__ import annotations

import random
import sys
from types import SimpleNamespace

import pytest
import torch

from depthkv.allocation import ALLOCATORS, AllocatorError, BudgetSpec, allocate, register_allocator
from depthkv.allocation.budgets import BudgetError, uniform
from depthkv.interop import kvpress as kvi

SKIP_REASON = ("kvpress is not installed here (it needs transformers < 5.3): "
               "bash scripts/kvpress_env.sh, then run these tests with .venv-kvpress/bin/python")


# ------------------------------------------------------------------ pure arithmetic
def test_kvpress_rounding_rule():
    assert kvi.kvpress_n_kept(100, 0.0) == 100
    assert kvi.kvpress_n_kept(100, 0.5) == 50
    assert kvi.kvpress_n_kept(100, 0.999) == 1  # floored at one key
    assert kvi.kvpress_n_kept(100, 1.0) == 0
    assert kvi.kvpress_n_kept(200, 0.9) == 19  # 200 * (1 - 0.9) = 19.999999999999996: truncation


def test_naive_conversion_is_off_by_one_and_ours_is_not():
    n, b = 200, 20
    assert kvi.kvpress_n_kept(n, 1 - b / n) == b - 1  # what Budgets.layer_ratios would give kvpress
    assert kvi.kvpress_n_kept(n, kvi.ratio_for_count(b, n)) == b


def test_ratio_for_count_is_exact_for_every_count():
    for n in range(1, 600):
        for b in range(0, n + 1):
            r = kvi.ratio_for_count(b, n)
            assert 0.0 <= r <= 1.0
            assert kvi.kvpress_n_kept(n, r) == b, (n, b, r)
    rng = random.Random(0)
    for n in (4096, 8191, 32768, 131072, 1_000_003, 10**8):
        for b in [1, 2, n // 3, n // 2, n - 2, n - 1, n] + [rng.randrange(1, n) for _ in range(200)]:
            assert kvi.kvpress_n_kept(n, kvi.ratio_for_count(b, n)) == b, (n, b)


def test_ratio_zero_only_for_whole_layers():
    assert kvi.ratio_for_count(37, 37) == 0.0
    assert kvi.ratio_for_count(36, 37) > 0.0
    assert kvi.ratio_for_count(0, 37) == 1.0


def test_ratio_for_count_rejects_impossible_counts():
    with pytest.raises(BudgetError):
        kvi.ratio_for_count(11, 10)
    with pytest.raises(BudgetError):
        kvi.ratio_for_count(-1, 10)
    with pytest.raises(BudgetError):
        kvi.ratio_for_count(0, 0)


@pytest.mark.parametrize("strategy", ["uniform", "pyramid", "mlp"])
@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.9])
def test_layer_ratios_round_trip_allocations(strategy, ratio):
    for n in (700, 1000, 1049, 4096):  # 30 layers x 20-token floor fits at ratio = 0.9
        b = allocate(strategy, 30, n, ratio, min_tokens=20)
        ratios = kvi.layer_ratios(b)
        assert len(ratios) == 30
        assert kvi.kept_counts(ratios, n) == list(b.tokens)
        assert sum(kvi.kept_counts(ratios, n)) == round(30 * n * (1 - ratio))


def test_layer_ratios_with_protected_layer_and_plain_lists():
    b = uniform(4, 100, 0.6, protected=(0,))
    ratios = kvi.layer_ratios(b)
    assert ratios[0] == 0.0 and all(r > 0 for r in ratios[1:])
    assert kvi.layer_ratios(list(b.tokens), 100) == ratios
    with pytest.raises(BudgetError):
        kvi.layer_ratios([10, 20])  # no context length
    with pytest.raises(BudgetError):
        kvi.layer_ratios(b, 101)  # budgets made for another length
    with pytest.raises(BudgetError):
        kvi.layer_ratios([], 10)


def _fake_kvpress(monkeypatch):
    """kvpress stand-in: PerLayerCompressionPress returns the ratios it was given (no kvpress needed)."""
    fake = SimpleNamespace(PerLayerCompressionPress=lambda press, compression_ratios: compression_ratios)
    monkeypatch.setattr(kvi, "require_kvpress", lambda: fake)
    monkeypatch.setattr(kvi, "_check_inner", lambda press: None)


def test_ratio_presses_take_depthkv_budgets_from_the_builder(monkeypatch):
    _fake_kvpress(monkeypatch)
    for n in (400, 1049):
        want = BudgetSpec(0.75, "pyramid", min_tokens=20).for_context(30, n)
        assert want == allocate("pyramid", 30, n, 0.75, min_tokens=20)
        got = kvi.per_layer_press(None, ratio=0.75, strategy="pyramid", n_layers=30, context_len=n)
        assert got == kvi.layer_ratios(want)
    with pytest.raises(AllocatorError, match="n_layers"):
        kvi.per_layer_press(None, ratio=0.5, context_len=100)  # neither n_layers nor profile
    with pytest.raises(AllocatorError, match="optimal"):
        kvi.per_layer_press(None, ratio=0.5, strategy="optimal", n_layers=30, context_len=100)  # no profile


def test_input_adaptive_policies_are_refused(monkeypatch):
    """kvpress compresses each layer in its own hook, before later layers are scored: no scores to give."""
    _fake_kvpress(monkeypatch)

    @register_allocator("toy-kvpress-scores", needs=("scores",))
    def toy(request, sensitivity=None, *, scores):
        """Toy input-adaptive allocator."""
        return allocate("uniform", request.n_layers, request.context_len, request.ratio)

    try:
        with pytest.raises(AllocatorError, match="adapts to the input"):
            kvi.depthkv_press(None, ratio=0.5, strategy="toy-kvpress-scores", n_layers=4)
        with pytest.raises(AllocatorError, match="adapts to the input"):
            kvi.depthkv_press(None, policy=BudgetSpec(0.5, "toy-kvpress-scores").policy(4))
        with pytest.raises(AllocatorError, match="adapts to the input"):
            kvi.per_layer_press(None, ratio=0.5, strategy="toy-kvpress-scores", n_layers=4, context_len=100)
    finally:
        del ALLOCATORS["toy-kvpress-scores"]


def test_missing_kvpress_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "kvpress", None)  # makes `import kvpress` raise ImportError
    with pytest.raises(ImportError, match=r"depthkv\[kvpress\].*transformers < 5\.3"):
        kvi.require_kvpress()
    with pytest.raises(ImportError, match=r"depthkv\[kvpress\]"):
        kvi.per_layer_press(object(), [1], context_len=1)


# ------------------------------------------------------------------ kvpress end to end (tiny random model)
def _prefill(model, ids, press):
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.no_grad(), press(model):
        model.model(input_ids=ids, past_key_values=cache)
    return cache


@pytest.mark.parametrize("strategy", ["uniform", "pyramid"])
def test_per_layer_press_keeps_depthkv_budgets(tiny_models, strategy):
    pytest.importorskip("kvpress", reason=SKIP_REASON)
    from kvpress import KnormPress, SnapKVPress

    model = tiny_models("llama", "sdpa", n_layers=4)
    gen = torch.Generator().manual_seed(3)
    n = 300  # ratio = 0.9 leaves 30 tokens a layer, above the 20-token floor
    ids = torch.randint(0, 256, (1, n), generator=gen)
    for ratio in (0.5, 0.75, 0.9):
        budgets = allocate(strategy, 4, n, ratio, min_tokens=20)
        for inner in (SnapKVPress(window_size=8), KnormPress()):
            cache = _prefill(model, ids, kvi.per_layer_press(inner, budgets))
            assert [layer.keys.shape[2] for layer in cache.layers] == list(budgets.tokens)
            # the same budgets from ratio + strategy
            press = kvi.per_layer_press(inner, ratio=ratio, strategy=strategy, n_layers=4, context_len=n)
            assert press.compression_ratios == kvi.layer_ratios(budgets)


def test_dynamic_press_follows_the_context_length(tiny_models):
    pytest.importorskip("kvpress", reason=SKIP_REASON)
    from kvpress import SnapKVPress

    model = tiny_models("llama", "sdpa", n_layers=4)
    press = kvi.depthkv_press(SnapKVPress(window_size=8), ratio=0.75, strategy="pyramid", n_layers=4)
    assert press.compression_ratio == 0.75
    gen = torch.Generator().manual_seed(4)
    for n in (120, 173):
        ids = torch.randint(0, 256, (1, n), generator=gen)
        cache = _prefill(model, ids, press)
        want = allocate("pyramid", 4, n, 0.75, min_tokens=20)
        assert press.last_budgets == want
        lengths = [layer.keys.shape[2] for layer in cache.layers]
        assert lengths == list(want.tokens)
        assert sum(lengths) == round(4 * n * 0.25)
        # decoding from the ragged cache one token at a time (no mask is built) leaves the prefix alone
        with torch.no_grad(), press(model):
            for i in range(3):
                pos = torch.tensor([[n + i]])
                model(input_ids=ids[:, :1], past_key_values=cache, position_ids=pos)
        assert [layer.keys.shape[2] for layer in cache.layers] == [t + 3 for t in want.tokens]


def test_adapter_refuses_presses_with_their_own_layer_rule():
    pytest.importorskip("kvpress", reason=SKIP_REASON)
    from kvpress import PyramidKVPress

    with pytest.raises(TypeError, match="PyramidKVPress"):
        kvi.per_layer_press(PyramidKVPress(), [5, 5], context_len=10)
    with pytest.raises(TypeError, match="ScorerPress"):
        kvi.depthkv_press(object(), ratio=0.5, n_layers=2)


def test_keydiff_scores_as_kvpress_keydiffpress_does():
    """depthkv's ``keydiff`` ranks the keys of each head as kvpress's KeyDiffPress does (same paper, own code)."""
    pytest.importorskip("kvpress", reason=SKIP_REASON)
    from kvpress import KeyDiffPress

    from depthkv.scorers.keydiff import key_distinctiveness

    gen = torch.Generator().manual_seed(5)
    keys, values = torch.randn(2, 3, 50, 16, generator=gen), torch.randn(2, 3, 50, 16, generator=gen)
    theirs = KeyDiffPress(compression_ratio=0.5).score(None, None, keys, values, None, {})
    torch.testing.assert_close(key_distinctiveness(keys), theirs.float())
