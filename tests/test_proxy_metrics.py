"""Tests of depthkv.calibration.{metrics, stages, proxy}: hand-made cases and tiny random models."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import transformers

from depthkv.calibration import metrics as M
from depthkv.calibration.proxy import (
    DEFAULT_INFONCE_STAGE,
    METRICS,
    ProxyResult,
    best_proxy,
    compute_proxy_metrics,
    infonce_per_layer,
    spearman_table,
    token_dropout,
    word_dropout,
)
from depthkv.calibration.stages import STAGES, capture_stages
from depthkv.models.layers import decoder_layers

# ---------------------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------------------

_TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
)


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**_TINY)).eval()


@pytest.fixture(scope="module")
def qwen2():
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**_TINY)).eval()


@pytest.fixture(scope="module")
def seqs():
    g = np.random.default_rng(0)
    return [g.integers(3, 256, size=n).tolist() for n in (24, 31, 17, 40, 22, 12, 28, 35)]


# ---------------------------------------------------------------------------------------------------------
# pure metrics
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(40, 8), (8, 40), (64, 64)])
def test_spectral_entropy_rank1_is_zero(shape):
    g = np.random.default_rng(1)
    t, d = shape
    z = np.outer(g.normal(size=t), g.normal(size=d)) * 100.0 + g.normal(size=d)  # rank 1 after centring
    assert M.spectral_entropy(z) == 0.0
    assert M.effective_rank(z) == 1.0
    assert np.count_nonzero(M.singular_values(z)) == 1


@pytest.mark.parametrize("k", [2, 5, 16])
def test_spectral_entropy_isotropic(k):
    # rows +e_i and -e_i: zero mean, centred Gram = 2 I -> k equal singular values
    z = np.vstack([np.eye(k), -np.eye(k)]) * 3.0
    assert M.spectral_entropy(z) == pytest.approx(math.log(k), abs=1e-10)
    assert M.effective_rank(z) == pytest.approx(k, abs=1e-8)
    # rotated into a larger space: same spectrum
    q, _ = np.linalg.qr(np.random.default_rng(2).normal(size=(32, 32)))
    zr = np.hstack([z, np.zeros((2 * k, 32 - k))]) @ q
    assert M.effective_rank(torch.tensor(zr)) == pytest.approx(k, abs=1e-8)


def test_singular_values_match_svd():
    z = np.random.default_rng(3).normal(size=(50, 20))
    ref = np.linalg.svd(z - z.mean(0), compute_uv=False)
    np.testing.assert_allclose(M.singular_values(z), ref, rtol=1e-10, atol=1e-10)


def test_spectral_entropy_degenerate_is_nan():
    assert math.isnan(M.spectral_entropy(np.ones((5, 3))))


def test_curvature_identical_rows_zero():
    row = np.random.default_rng(4).normal(size=16)
    assert M.curvature(np.tile(row, (12, 1))) == pytest.approx(0.0, abs=1e-12)
    assert M.curvature(np.tile(row, (3, 1))) == pytest.approx(0.0, abs=1e-12)  # T <= 5
    assert math.isnan(M.curvature(row[None, :]))


def test_curvature_small_t_and_orthogonal():
    # T = 3 orthogonal rows: every neighbour has cos 0 -> curvature 1
    assert M.curvature(np.eye(3)) == pytest.approx(1.0)
    # two antipodal clusters of 6: kNN_5 stays inside the cluster -> 0
    z = np.vstack([np.tile([1.0, 0.0], (6, 1)), np.tile([-1.0, 0.0], (6, 1))])
    assert M.curvature(z) == pytest.approx(0.0, abs=1e-12)


def test_token_metrics_batch_matches_single():
    g = np.random.default_rng(10)
    zs = [g.normal(size=(12, 6)), g.normal(size=(7, 6)), g.normal(size=(12, 6)), np.ones((4, 6))]
    out = M.token_metrics_batch([torch.tensor(z) for z in zs])
    assert out.shape == (4, 2)
    for i, z in enumerate(zs):
        h, c = M.spectral_entropy(z), M.curvature(z)
        assert (math.isnan(h) and math.isnan(out[i, 0])) or out[i, 0].item() == pytest.approx(h, abs=1e-12)
        assert out[i, 1].item() == pytest.approx(c, abs=1e-12)


def test_dime_lidar_identical_zero():
    g = np.random.default_rng(5)
    o = g.normal(size=32)
    assert M.dime(o, o) == pytest.approx(0.0, abs=1e-12)
    assert M.lidar(o, o) == 0.0
    assert M.dime(o, -o) == pytest.approx(2.0)
    assert M.lidar(o, o + 3.0 * np.eye(32)[0]) == pytest.approx(3.0)
    batch = g.normal(size=(4, 32))
    np.testing.assert_allclose(M.dime(batch, batch), 0.0, atol=1e-12)
    assert M.dime(batch, batch).shape == (4,)


def test_infonce_aligned_lower_than_shuffled():
    g = np.random.default_rng(6)
    o = np.eye(8, 32) * 5.0 + 0.01 * g.normal(size=(8, 32))  # well-separated samples
    a = o + 0.01 * g.normal(size=o.shape)  # perturbed views: aligned
    aligned = M.infonce(o, a)
    shuffled = M.infonce(o, a[np.roll(np.arange(8), 1)])
    assert aligned.shape == (8,)
    assert np.all(aligned > 0)
    assert aligned.mean() < 1e-3 < 1.0 < shuffled.mean()
    # higher temperature -> softer
    assert M.infonce(o, a, tau=1.0).mean() > aligned.mean()
    # one sample: no negatives, loss 0
    assert M.infonce(o[:1], a[:1])[0] == pytest.approx(0.0)


def test_infonce_matches_formula():
    g = np.random.default_rng(7)
    o, a, tau = g.normal(size=(5, 6)), g.normal(size=(5, 6)), 0.3
    cos = lambda x, y: x @ y / np.linalg.norm(x) / np.linalg.norm(y)  # noqa: E731
    for i in range(5):
        num = math.exp(cos(o[i], a[i]) / tau)
        den = num + sum(math.exp(cos(o[i], o[j]) / tau) for j in range(5) if j != i)
        assert M.infonce(o, a, tau)[i] == pytest.approx(-math.log(num / den), rel=1e-10)


# ---------------------------------------------------------------------------------------------------------
# stage capture
# ---------------------------------------------------------------------------------------------------------


def _n_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_capture_shapes_and_residual_identity(name, request, seqs):
    model = request.getfixturevalue(name)
    n_layers = len(decoder_layers(model))
    assert n_layers == 3
    ids = torch.tensor([seqs[0]])
    with torch.no_grad(), capture_stages(model, max_tokens=None) as cap:
        model(ids)
    assert set(cap.tokens) == set(STAGES) == set(cap.pooled)
    for s in STAGES:
        assert sorted(cap.tokens[s]) == [0, 1, 2]
        for li in range(n_layers):
            assert tuple(cap.token_matrix(s, li).shape) == (len(seqs[0]), 64)
        assert tuple(cap.pooled_array(s).shape) == (1, n_layers, 64)
    for li in range(n_layers):
        a, b, c = (cap.token_matrix(s, li) for s in ("attn_in", "attn_out", "attn_resid"))
        torch.testing.assert_close(a + b, c, atol=1e-5, rtol=0)
        if li + 1 < n_layers:  # next layer's input = (c) + (d)
            d, nxt = cap.token_matrix("mlp_out", li), cap.token_matrix("attn_in", li + 1)
            torch.testing.assert_close(c + d, nxt, atol=1e-5, rtol=0)
    # stage (a) of layer 0 is the embedding
    emb = model.get_input_embeddings()(ids)[0]
    torch.testing.assert_close(cap.token_matrix("attn_in", 0), emb)
    assert _n_hooks(model) == 0


def test_capture_padding_and_subsampling(llama, seqs):
    s0, s1 = seqs[0], seqs[2]  # 24 and 17 tokens
    ids = torch.zeros((2, 24), dtype=torch.long)
    mask = torch.zeros((2, 24), dtype=torch.long)
    ids[0], mask[0] = torch.tensor(s0), 1
    ids[1, :17], mask[1, :17] = torch.tensor(s1), 1
    with torch.no_grad(), capture_stages(llama, max_tokens=10, seed=3) as cap:
        cap.set_batch(mask, [7, 9])
        llama.model(input_ids=ids, attention_mask=mask, use_cache=False)
    with torch.no_grad(), capture_stages(llama, max_tokens=None) as ref:
        llama(torch.tensor([s1]))
    assert cap.sample_ids() == [7, 9]
    assert tuple(cap.token_matrix("mlp_out", 2, 9).shape) == (10, 64)
    idx = cap.token_index(9, 17)
    torch.testing.assert_close(
        cap.token_matrix("mlp_out", 2, 9), ref.token_matrix("mlp_out", 2)[idx], atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        cap.pooled_array("attn_resid", [9])[0], ref.pooled_array("attn_resid")[0], atol=1e-6, rtol=0
    )


def test_hooks_removed_on_exception(llama, qwen2):
    for model in (llama, qwen2):
        with pytest.raises(RuntimeError, match="boom"):
            with capture_stages(model):
                assert _n_hooks(model) == 4 * 3
                raise RuntimeError("boom")
        assert _n_hooks(model) == 0


def test_capture_rejects_non_decoder():
    with pytest.raises(ValueError, match="decoder layers"):
        with capture_stages(torch.nn.Linear(2, 2)):
            pass


# ---------------------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------------------


def test_compute_proxy_metrics_deterministic_and_finite(llama, seqs):
    r1 = compute_proxy_metrics(llama, None, seqs, n_boot=200, seed=1)
    r2 = compute_proxy_metrics(llama, None, seqs, n_boot=200, seed=1)
    assert r1.metrics == list(METRICS) and r1.stages == list(STAGES)
    assert r1.n_layers == 3 and r1.n_samples == len(seqs)
    for m in METRICS:
        for s in STAGES:
            mean, lo, hi = r1.get(m, s)
            assert mean.shape == lo.shape == hi.shape == (3,)
            assert np.all(np.isfinite(mean)) and np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))
            assert np.all(lo <= mean + 1e-12) and np.all(mean <= hi + 1e-12)
            assert r1.per_sample[m][s].shape == (len(seqs), 3)
            np.testing.assert_array_equal(mean, r2.mean[m][s])
            np.testing.assert_array_equal(lo, r2.lo[m][s])
    np.testing.assert_allclose(
        r1.mean["effective_rank"]["mlp_out"], np.exp(r1.per_sample["spectral_entropy"]["mlp_out"]).mean(0)
    )
    # another seed -> another perturbation
    r3 = compute_proxy_metrics(llama, None, seqs, n_boot=200, seed=2)
    assert not np.array_equal(r1.mean["lidar"]["attn_in"], r3.mean["lidar"]["attn_in"])
    # forward batching does not change the result beyond float rounding
    r4 = compute_proxy_metrics(llama, None, seqs, n_boot=200, seed=1, batch_size=3)
    for m in METRICS:
        np.testing.assert_allclose(r4.mean[m]["attn_resid"], r1.mean[m]["attn_resid"], rtol=1e-4, atol=1e-6)
    # JSON round trip, no pickle
    back = ProxyResult.from_dict(json.loads(json.dumps(r1.to_dict(), allow_nan=False)))
    for m in METRICS:
        for s in STAGES:
            np.testing.assert_array_equal(back.mean[m][s], r1.mean[m][s])
            np.testing.assert_array_equal(back.hi[m][s], r1.hi[m][s])
    assert back.config == r1.config
    np.testing.assert_array_equal(infonce_per_layer(r1), r1.mean["infonce"][DEFAULT_INFONCE_STAGE])


def test_compute_proxy_metrics_restores_model_state(seqs):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**_TINY)).to(torch.bfloat16).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = compute_proxy_metrics(model, None, seqs[:3], n_boot=10)
    assert np.isfinite(res.mean["dime"]["attn_out"]).all()
    assert model.training
    after = model.state_dict()
    for k, v in before.items():
        assert after[k].dtype == v.dtype
        torch.testing.assert_close(after[k], v, atol=0, rtol=0)
    assert _n_hooks(model) == 0


def test_infonce_batch_option(llama, seqs):
    r = compute_proxy_metrics(llama, None, seqs, n_boot=10, infonce_batch=4)
    full = compute_proxy_metrics(llama, None, seqs, n_boot=10)
    # fewer negatives -> lower (or equal) loss on average
    assert (r.mean["infonce"]["attn_in"] <= full.mean["infonce"]["attn_in"] + 1e-12).all()
    np.testing.assert_array_equal(r.mean["dime"]["attn_in"], full.mean["dime"]["attn_in"])


def test_pooled_only_mode(llama, seqs):
    fast = compute_proxy_metrics(llama, None, seqs, n_boot=50, token_metrics=False)
    full = compute_proxy_metrics(llama, None, seqs, n_boot=50)
    for s in STAGES:
        assert np.isnan(fast.mean["spectral_entropy"][s]).all() and np.isnan(fast.lo["curvature"][s]).all()
        for m in ("dime", "lidar", "infonce"):
            np.testing.assert_array_equal(fast.mean[m][s], full.mean[m][s])
    json.dumps(fast.to_dict(), allow_nan=False)  # NaN -> null
    rows = spearman_table(fast, np.arange(3.0))
    assert all(math.isnan(r.rho) for r in rows if r.metric == "curvature")


class _ByteTokenizer:
    """Stand-in tokenizer: BOS (1) + one id per byte, folded into the tiny vocabulary."""

    def __call__(self, text):
        return {"input_ids": [1] + [3 + b % 250 for b in text.encode()]}


def test_text_inputs_with_tokenizer(llama):
    texts = [f"sample {i}: the quick brown fox jumps over the lazy dog near river {i}" for i in range(5)]
    r = compute_proxy_metrics(llama, _ByteTokenizer(), texts, n_boot=50, seed=4)
    assert r.config["input_kind"] == "text"
    pairs = list(zip(r.config["n_tokens_original"], r.config["n_tokens_perturbed"], strict=True))
    assert all(p <= o for o, p in pairs) and any(p < o for o, p in pairs)
    assert np.isfinite(r.mean["infonce"]["attn_out"]).all()


def test_text_inputs_need_tokenizer(llama):
    with pytest.raises(ValueError, match="tokenizer"):
        compute_proxy_metrics(llama, None, ["hello world"])


def test_dropout_helpers():
    text = "  the quick brown fox jumps over the lazy dog " * 5
    a = word_dropout(text, 0.1, np.random.default_rng([0, 0, 2]))
    b = word_dropout(text, 0.1, np.random.default_rng([0, 0, 2]))
    assert a == b and a.startswith("  ") and len(a.split()) < len(text.split())
    assert set(a.split()) <= set(text.split())
    assert word_dropout("one", 0.999, np.random.default_rng(0)) == "one"
    ids = list(range(1, 101))
    out = token_dropout(ids, 0.5, np.random.default_rng(0), protect_first=True)
    assert out[0] == 1 and 20 < len(out) < 80 and out == sorted(out)
    assert len(token_dropout([5], 0.999, np.random.default_rng(0))) == 1


# ---------------------------------------------------------------------------------------------------------
# analysis
# ---------------------------------------------------------------------------------------------------------


def _synthetic_result(n_layers=8):
    g = np.random.default_rng(8)
    tab = {m: {s: g.normal(size=n_layers) for s in STAGES} for m in METRICS}
    tab["infonce"]["attn_out"] = np.arange(n_layers, dtype=float) ** 2  # monotone in depth
    tab["curvature"]["mlp_out"] = np.full(n_layers, 0.5)  # constant
    zeros = {m: {s: np.zeros(n_layers) for s in STAGES} for m in METRICS}
    return ProxyResult(list(METRICS), list(STAGES), n_layers, 4, tab, zeros, zeros)


def test_spearman_planted_monotone():
    res = _synthetic_result()
    sens = 10.0 + np.log1p(np.arange(8.0))  # monotone increasing
    rows = spearman_table(res, sens)
    assert len(rows) == len(METRICS) * len(STAGES)
    row = next(r for r in rows if (r.metric, r.stage) == ("infonce", "attn_out"))
    assert row.rho == pytest.approx(1.0) and row.p < 1e-6
    const = next(r for r in rows if (r.metric, r.stage) == ("curvature", "mlp_out"))
    assert math.isnan(const.rho) and math.isnan(const.p)
    best = best_proxy(res, sens)
    assert (best.metric, best.stage) == ("infonce", "attn_out")
    assert best_proxy(rows) == best
    # negative relation is found by |rho|; NaN layers are left out
    sens2 = -sens.copy()
    sens2[0] = np.nan
    best2 = best_proxy(res, sens2)
    assert (best2.metric, best2.stage, best2.rho) == ("infonce", "attn_out", pytest.approx(-1.0))
    # all constant -> NaN everywhere, best_proxy refuses
    assert all(math.isnan(r.rho) for r in spearman_table(res, np.ones(8)))
    with pytest.raises(ValueError):
        best_proxy(res, np.ones(8))
    with pytest.raises(ValueError):
        spearman_table(res, np.ones(5))
