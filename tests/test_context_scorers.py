"""Question-independent scorers: KVzip (context reconstruction) and Expected Attention, on tiny models."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import depthkv
from depthkv.engine import Protection, score_prefill
from depthkv.engine.cache import layer_lengths
from depthkv.engine.reconstruct import ContextPassError, replay_chunks, replay_inputs
from depthkv.scorers import ExpectedAttention, KVzip, ScoreInputs, get_scorer
from depthkv.scorers.expected_attention import rope_matrix, rotate
from depthkv.scorers.kvzip import _max_attention, span_max_pool
from tests.conftest import KVZIP_PROMPT as PROMPT
from tests.conftest import context_ids as _ids


def _reference_kvzip(model, ctx: torch.Tensor, scorer: KVzip) -> list[torch.Tensor]:
    """Max attention from replayed tokens to each context key, from plain full forwards (eager attentions);
    under ``normalise="chunk"`` each replayed query's probabilities renormalised over the sink keys, its chunk's
    keys and the replayed tokens (the others set to 0)."""
    n = ctx.shape[1]
    kvh = model.config.num_key_value_heads
    best = None
    for chunk, (start, end) in replay_chunks(scorer, ctx):
        full = torch.cat([ctx, chunk], dim=1)
        with torch.no_grad():
            att = model(full, output_attentions=True).attentions  # per layer [1, H, T, T]
        per = []
        for a in att:
            a = a[0, :, n:, :]  # replayed queries -> all keys: [H, R, N + R]
            if scorer.normalise == "chunk":
                keep = torch.ones(a.shape[-1], dtype=torch.bool)
                keep[:n] = False
                keep[:scorer.sink] = True
                keep[start:end] = True
                a = torch.where(keep, a, 0.0)
                a = a / a.sum(-1, keepdim=True)
            a = a[..., :n]
            if scorer.self_window is not None:  # leave out each key's copying queries
                replayed = torch.full((a.shape[-2],), -10**9)
                replayed[a.shape[-2] - (end - start):] = torch.arange(start, end)
                near = (replayed[:, None] - (torch.arange(n)[None, :] - 1)).abs() <= scorer.self_window
                a = torch.where(near, a * scorer.self_weight, a)
            per.append(a.reshape(kvh, -1, a.shape[-2], n).amax(dim=(1, 2))[None])
        best = per if best is None else [torch.maximum(b, p) for b, p in zip(best, per)]
    return best


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("chunk", [200, 33])
def test_kvzip_scores_equal_attention_of_full_forwards(tiny_models, arch, chunk):
    model = tiny_models(arch, "eager")
    ctx = _ids(90)
    scorer = KVzip(replay_chunk=chunk, prompt_ids=PROMPT)
    sp = score_prefill(model, ctx, [scorer], Protection())
    ref = _reference_kvzip(model, ctx, scorer)
    assert sp.context_pass.forwards == math.ceil(90 / chunk)
    for got, want in zip(sp.scores["kvzip"], ref):
        assert got.shape == (1, 2, 90)  # one score per KV head (GQA: max over the group's 2 query heads)
        torch.testing.assert_close(got, want.float(), atol=2e-5, rtol=1e-4)
    # the replayed tokens are gone again: the cache holds exactly the context
    assert layer_lengths(sp.cache) == [90] * 4 and sp.cache.get_seq_length() == 90


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize(("chunk", "window", "weight", "normalise"),
                         [(200, 0, 0.0, "context"), (33, 2, 0.0, "context"), (33, 1, 0.0, "chunk"),
                          (33, 1, 0.25, "context")])
def test_kvzip_self_window_leaves_out_the_copying_queries(tiny_models, arch, chunk, window, weight, normalise):
    model = tiny_models(arch, "eager")
    ctx = _ids(90, seed=4)
    scorer = KVzip(replay_chunk=chunk, prompt_ids=PROMPT, self_window=window, self_weight=weight, normalise=normalise)
    got = score_prefill(model, ctx, [scorer], Protection()).scores["kvzip"]
    ref = _reference_kvzip(model, ctx, scorer)
    plain = score_prefill(model, ctx, [KVzip(replay_chunk=chunk, prompt_ids=PROMPT, normalise=normalise)],
                          Protection()).scores["kvzip"]
    for g, w, p in zip(got, ref, plain, strict=True):
        torch.testing.assert_close(g, w.float(), atol=2e-5, rtol=1e-4)
        assert bool((g <= p + 1e-6).all())  # fewer queries: never a larger maximum
    assert any(not torch.allclose(g, p, atol=1e-4) for g, p in zip(got, plain))


def test_kvzip_self_window_is_checked():
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="self_window"):
            KVzip(self_window=bad)
    for bad in (-0.1, 1.5, True, "0.5"):
        with pytest.raises(ValueError, match="self_weight"):
            KVzip(self_window=1, self_weight=bad)
    assert KVzip(self_window=0).self_window == 0 and KVzip().self_window is None


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("chunk", [200, 33])
def test_kvzip_chunk_normalisation_equals_renormalised_attention(tiny_models, arch, chunk):
    model = tiny_models(arch, "eager")
    ctx = _ids(90, seed=1)
    scorer = KVzip(replay_chunk=chunk, prompt_ids=PROMPT, normalise="chunk", sink=3)
    got = score_prefill(model, ctx, [scorer], Protection()).scores["kvzip"]
    ref = _reference_kvzip(model, ctx, scorer)
    for g, w in zip(got, ref):
        torch.testing.assert_close(g, w.float(), atol=2e-5, rtol=1e-4)
    plain = score_prefill(model, ctx, [KVzip(replay_chunk=chunk, prompt_ids=PROMPT)], Protection()).scores["kvzip"]
    if chunk >= 90:  # one chunk: both normalisations see the same keys
        for g, p in zip(got, plain):
            torch.testing.assert_close(g, p, atol=1e-6, rtol=1e-5)
    else:  # several chunks: other normalisers, and other chunks' replays no longer count
        assert any(not torch.allclose(g, p, atol=1e-4) for g, p in zip(got, plain))


def test_rescored_replays_on_the_same_prefill(tiny_models):
    """Another KVzip variant on one prefill: the same scores as its own score_prefill, the cache left as it was."""
    model = tiny_models("qwen2", "eager")
    ctx = _ids(90, seed=2)
    plain = KVzip(replay_chunk=33, prompt_ids=PROMPT)
    chunk = KVzip(replay_chunk=33, prompt_ids=PROMPT, normalise="chunk")
    sp = score_prefill(model, ctx, [plain], Protection())
    before = [layer.keys.clone() for layer in sp.cache.layers]
    again = sp.rescored(model, ctx, chunk)
    want = score_prefill(model, ctx, [chunk], Protection()).scores["kvzip"]
    for got, w in zip(again.scores["kvzip"], want, strict=True):
        torch.testing.assert_close(got, w)
    assert again.context_pass.forwards == 3 and again.cache is sp.cache
    assert all(torch.equal(b, layer.keys) for b, layer in zip(before, sp.cache.layers, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(sp.scores["kvzip"], again.scores["kvzip"], strict=True))
    with pytest.raises(ValueError, match="reads the prefill itself"):
        sp.rescored(model, ctx, get_scorer("snapkv"))
    with pytest.raises(ValueError, match="unpadded sequence of 90 tokens"):
        sp.rescored(model, ctx[:, :50], chunk)


def test_kvzip_chunk_masked_path_equals_subset_path():
    """Heads seeing different numbers of keys (a per-head pruned cache) take the masked path: same scores."""
    g = torch.Generator().manual_seed(3)
    b, kvh, grp, n, q, d = 1, 2, 2, 24, 5, 8
    x = ScoreInputs(torch.randn(b, kvh * grp, q, d, generator=g), torch.randn(b, kvh, n + q, d, generator=g),
                    torch.randn(b, kvh, n + q, d, generator=g), torch.arange(n + q).expand(b, kvh, n + q).clone(),
                    d ** -0.5, 0, n_context=n, replay_span=(10, 20))
    s = KVzip(prompt_ids=PROMPT, normalise="chunk", sink=2)
    subset = s.score(x)  # every head sees 2 + 10 context keys: gathered subset
    assert bool((subset[..., 2:10] == 0).all()) and bool((subset[..., 20:] == 0).all())
    masked = _max_attention(x, n, s._visible(x))
    torch.testing.assert_close(subset, masked, atol=1e-6, rtol=1e-5)
    # head 1 holds other logical positions (as after a per-head pruning): its visible count differs
    x.positions[0, 1, :n] = torch.arange(0, 2 * n, 2)
    mixed = s.score(x)
    vis = s._visible(x)
    assert int(vis[0, 0, :n].sum()) != int(vis[0, 1, :n].sum())
    torch.testing.assert_close(mixed, _max_attention(x, n, vis), atol=1e-6, rtol=1e-5)
    assert bool((mixed[0, 1][~vis[0, 1, :n]] == 0).all())


def test_kvzip_chunk_spans_in_chunked_compress(tiny_models):
    """A chunked compress replays each prefill chunk at its own logical positions."""
    spans = []

    class Spy(KVzip):
        def score(self, x):
            spans.append((x.layer_idx, x.replay_span))
            return super().score(x)

    model = tiny_models("qwen2", "eager")
    spy = Spy(replay_chunk=16, prompt_ids=PROMPT, normalise="chunk")
    with depthkv.press(model, scorer=spy, ratio=0.5, mode="chunked", chunk_size=40) as p:
        p.compress(_ids(80))
    assert sorted({s for layer, s in spans if layer == 0}) == [(0, 16), (16, 32), (32, 40), (40, 56), (56, 72),
                                                               (72, 80)]


@pytest.mark.parametrize("bad", [{"normalise": "global"}, {"sink": -1}, {"sink": 1.5}])
def test_kvzip_rejects_bad_normalisation(bad):
    with pytest.raises(ValueError, match="normalise|sink"):
        KVzip(**bad)


def test_kvzip_kernel_one_is_the_paper_score_and_pooling_widens_it(tiny_models):
    model = tiny_models("qwen2", "eager")
    ctx = _ids(70)
    one = KVzip(replay_chunk=30, prompt_ids=PROMPT, kernel=1)
    # kernel=1 is the default: the scores test_kvzip_scores_equal_attention_of_full_forwards checks
    assert one == KVzip(replay_chunk=30, prompt_ids=PROMPT)
    plain = score_prefill(model, ctx, [one], Protection()).scores["kvzip"]
    pooled = score_prefill(model, ctx, [KVzip(replay_chunk=30, prompt_ids=PROMPT, kernel=5)],
                           Protection()).scores["kvzip"]
    for p, q in zip(plain, pooled):
        assert q.shape == p.shape == (1, 2, 70)  # one score per KV head, GQA unchanged
        # pooling each replayed chunk then max-accumulating == pooling the accumulated max
        want = torch.nn.functional.max_pool1d(p.reshape(2, 1, 70), 5, stride=1, padding=2).reshape(1, 2, 70)
        torch.testing.assert_close(q, want)
        assert (q >= p).all() and (q > p).any()


def test_kvzip_kernel_three_on_a_hand_made_row():
    row = torch.tensor([0.1, 0.9, 0.2, 0.0, 0.0, 0.5, 0.3])
    other = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.7])  # KV heads are pooled independently
    assert span_max_pool(row[None, None], 1).equal(row[None, None])
    got = span_max_pool(torch.stack([row, other])[None], 3)
    want = torch.tensor([[[0.9, 0.9, 0.9, 0.2, 0.5, 0.5, 0.5], [0.0, 0.0, 0.0, 0.0, 0.0, 0.7, 0.7]]])
    assert got.shape == (1, 2, 7) and torch.equal(got, want)


@pytest.mark.parametrize("kernel", [0, 2, -1, 4, 1.0, True])
def test_kvzip_rejects_bad_kernel(kernel):
    with pytest.raises(ValueError, match="odd integer kernel"):
        KVzip(kernel=kernel)


def test_kvzip_bind_keeps_options():
    class Tok:
        chat_template = None

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) % 97 for c in text]}

    s = KVzip(replay_chunk=64, overlap=3, kernel=7, normalise="chunk", sink=2).bind(Tok())
    assert s.ready and (s.replay_chunk, s.overlap, s.kernel, s.normalise, s.sink) == (64, 3, 7, "chunk", 2)


def test_kvzip_replay_layout():
    s = KVzip(replay_chunk=4, overlap=2, prompt_ids=(1,), next_prompt_ids=(2,))
    chunks = replay_inputs(s, torch.arange(10, 20)[None])
    assert [c[0].tolist() for c in chunks] == [[1, 10, 11, 12, 13], [2, 12, 13, 14, 15, 16, 17], [2, 16, 17, 18, 19]]


def test_kvzip_without_prompt_says_how_to_fix(tiny_models):
    with pytest.raises(ContextPassError, match="tokenizer"):
        score_prefill(tiny_models(), _ids(40), [KVzip()], Protection())


def test_kvzip_bind_builds_chat_prompt():
    class Tok:
        chat_template = "x"

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) % 97 for c in text]}

        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
            return f"<u>{messages[0]['content']}</u><a>"

    s = KVzip().bind(Tok())
    assert s.ready and s.prompt_ids[-4:] == tuple(ord(c) % 97 for c in "</u><a>")[-4:]
    assert len(s.next_prompt_ids) > len(s.prompt_ids)


def test_rotate_matches_transformers_rope():
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    inv = 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8))
    ang = torch.arange(5).float()[:, None] * inv
    emb = torch.cat([ang, ang], dim=-1)
    hq, _ = apply_rotary_pos_emb(q, k, emb.cos()[None], emb.sin()[None])
    torch.testing.assert_close(rotate(q, ang), hq)
    torch.testing.assert_close(rotate(hq, -ang), q, atol=1e-6, rtol=1e-6)
    r = rope_matrix(inv, torch.arange(5))
    torch.testing.assert_close(torch.einsum("tij,bhtj->bhti", r.float(), q), hq, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cov", [False, True])
def test_expected_attention_matches_its_formula(cov):
    """E[exp(s q.k)] for q ~ N(R mu, R S R^T), soft-maxed over keys, mean over the group, times ||v||."""
    torch.manual_seed(1)
    b, kvh, g, n, d = 1, 2, 2, 24, 8
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).double() / d))
    pos = torch.arange(n)
    q_pre = torch.randn(b, kvh * g, n, d, dtype=torch.float64)
    q = rotate(q_pre, pos[None, None, :, None].double() * inv).float()
    key, value = torch.randn(b, kvh, n, d), torch.randn(b, kvh, n, d)
    x = ScoreInputs(q, key, value, pos.expand(b, kvh, n), 1 / math.sqrt(d), 0, inv.float())
    got = ExpectedAttention(n_future=16, n_sink=4, use_covariance=cov).score(x)
    stats = q_pre[:, :, 4:].reshape(b, kvh, g, n - 4, d)
    mu = stats.mean(dim=3)
    r = torch.stack([rope_matrix(inv, torch.tensor([t]))[0] for t in range(n, n + 16)]).mean(0)
    logits = torch.einsum("bhgd,bhkd->bhgk", mu @ r.T, key.double()) / math.sqrt(d)
    if cov:
        c = stats - mu[:, :, :, None]
        sigma = r @ (torch.einsum("bhgqi,bhgqj->bhgij", c, c) / (n - 4)) @ r.T
        logits = logits + 0.5 / d * torch.einsum("bhki,bhgij,bhkj->bhgk", key.double(), sigma, key.double())
    want = torch.softmax(logits, -1).mean(2) * value.double().norm(dim=-1)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("scorer", ["kvzip", "expected_attention"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_shapes_on_tiny_models(tiny_models, scorer, arch):
    opts = {"prompt_ids": PROMPT} if scorer == "kvzip" else {}
    sp = score_prefill(tiny_models(arch), _ids(64), [get_scorer(scorer, **opts)], Protection())
    for s in sp.scores[scorer]:
        assert s.shape == (1, 2, 64) and torch.isfinite(s).all() and (s >= 0).all()


@pytest.mark.parametrize("scorer", ["kvzip", "expected_attention"])
@pytest.mark.parametrize("mode", ["post", "chunked"])
def test_ratio_zero_is_the_full_cache(tiny_models, scorer, mode):
    model = tiny_models("qwen2")
    ctx, question = _ids(80), _ids(6, seed=3)
    opts = {"prompt_ids": PROMPT, "replay_chunk": 30} if scorer == "kvzip" else {}
    ids = torch.cat([ctx, question], dim=1)
    want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    p = depthkv.press(model, scorer, 0.0, mode=mode, chunk_size=32, **opts)
    comp = p.compress(ctx)
    assert layer_lengths(comp.cache) == [80] * 4
    got = p.answer(comp, question, max_new_tokens=8, do_sample=False)
    assert got.tolist() == want.tolist()


@pytest.mark.parametrize("mode", ["post", "chunked"])
def test_kvzip_prunes_to_budget_in_generate_and_compress(tiny_models, mode):
    model = tiny_models("llama")
    ids = _ids(100)
    p = depthkv.press(model, "kvzip", 0.6, mode=mode, chunk_size=40, prompt_ids=PROMPT)
    comp = p.compress(ids)
    assert layer_lengths(comp.cache) == [40] * 4
    stats = p.last_context_pass  # the replay's cost is measured: one forward per replayed chunk
    assert stats.forwards == (3 if mode == "chunked" else 1) and stats.tokens > 100 and stats.seconds > 0
    with p:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
        assert p.session.kept_kv_bytes is not None
    # generate prefilled all but the last prompt token, pruned to 40% of those 99
    assert p.budgets.tokens == (40, 40, 39, 39) or sum(p.budgets.tokens) == round(4 * 99 * 0.4)
    assert out.shape[1] == 104
