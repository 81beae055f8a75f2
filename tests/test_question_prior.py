"""Question queries (where calibration questions look) and KVzip's question-direction blend: the rotation equals
the model's own RoPE, the recorded mean equals the model's pre-RoPE queries, the blend keeps each head's scores
(so the budgets), and files made for another model or damaged are refused (tiny models, no downloads)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import depthkv
from depthkv.allocation import BudgetSpec
from depthkv.allocation.profile import Profile, ProfileError
from depthkv.calibration.ablation import CalibrationItem
from depthkv.calibration.queries import record_question_queries
from depthkv.cli import main
from depthkv.engine import Protection, score_prefill
from depthkv.engine.press import bind_scorer
from depthkv.engine.session import rope_inv_freq
from depthkv.models import model_identity
from depthkv.scorers import get_scorer
from depthkv.scorers.question_prior import (
    QUESTION_LEAD,
    QuestionQueries,
    QuestionQueriesError,
    question_logits,
    unrotate,
)
from depthkv.scorers.reorder import blend_reorder
from tests.conftest import KVZIP_PROMPT as PROMPT
from tests.conftest import context_ids as _ids
from tests.conftest import one_error_line


def _rope(model, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``x`` [1, H, T, d] rotated by the model's own rotary embedding at ``positions`` [T]."""
    cos, sin = model.model.rotary_emb(x, positions[None])
    return apply_rotary_pos_emb(x, x, cos, sin)[0]


def test_unrotate_and_question_logits_match_the_models_rope(tiny_models):
    model = tiny_models("llama")
    inv_freq = rope_inv_freq(model)
    g = torch.Generator().manual_seed(0)
    q_pre, k_pre = torch.randn(1, 4, 1, 16, generator=g), torch.randn(1, 2, 7, 16, generator=g)
    m, key_pos = 300, torch.tensor([0, 3, 50, 120, 200, 250, 299])
    q_post = _rope(model, q_pre, torch.tensor([m]))
    k_post = _rope(model, k_pre, key_pos)
    torch.testing.assert_close(unrotate(q_post, torch.tensor([[m]]), inv_freq), q_pre, atol=1e-5, rtol=1e-5)
    got = question_logits(q_pre[0, :, 0], k_post, inv_freq, m)  # [1, 2, 7]
    want = torch.einsum("bhgd,bhkd->bhk", q_post[:, :, 0].reshape(1, 2, 2, 16), k_post) / 2  # GQA group mean
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_recorded_queries_are_the_mean_pre_rope_query_of_question_and_answer(tiny_models):
    """Against the q_proj outputs (Llama's pre-RoPE queries) of the same tokens, averaged per item then over
    items."""
    model = tiny_models("llama")
    items = [CalibrationItem(_ids(40, seed=s), _ids(4, seed=s + 10), f"s{s}", question_ids=_ids(5, seed=s + 20))
             for s in range(2)]
    got = record_question_queries(model, items, {"note": "x"})
    assert got.table.shape == (4, 4, 16) and got.meta == {"note": "x", "n_items": 2}
    captured: dict[int, torch.Tensor] = {}
    hooks = [layer.self_attn.q_proj.register_forward_hook(
        lambda mod, inp, out, i=i: captured.__setitem__(i, out)) for i, layer in enumerate(model.model.layers)]
    try:
        want = torch.zeros(4, 4, 16)
        for item in items:
            prefix, forced = item.split()
            with torch.no_grad():
                model(torch.cat([prefix, forced], 1))
            for i in range(4):
                q = captured[i][0, -forced.shape[1]:].reshape(forced.shape[1], 4, 16)
                want[i] += q.mean(0) / len(items)
    finally:
        for h in hooks:
            h.remove()
    torch.testing.assert_close(got.table, want, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="agnostic"):
        record_question_queries(model, [CalibrationItem(_ids(40), _ids(4))])


def _queries_file(model, path, name="tiny", seed=0):
    g = torch.Generator().manual_seed(seed)
    ident = model_identity(model, name)
    table = torch.randn(ident["n_layers"], ident["n_heads"], ident["head_dim"], generator=g)
    return QuestionQueries(table, {"model": ident}).save(path)


@pytest.mark.parametrize("name", ["kvzip", "kvzip_vc"])
def test_question_blend_reorders_each_head_by_the_direction_logit_and_keeps_the_budgets(tiny_models, tmp_path, name):
    model = tiny_models("llama")
    path = _queries_file(model, tmp_path / "q.safetensors")
    n = 96
    plain = get_scorer(name, prompt_ids=PROMPT, replay_chunk=40, diversity=0.5)
    blended = get_scorer(name, prompt_ids=PROMPT, replay_chunk=40, diversity=0.5, question_queries=str(path),
                         question_weight=0.7)
    assert blended.whole_context and plain.replay_key() == blended.replay_key()
    sp = score_prefill(model, _ids(n), [plain], Protection(2, 4))
    again = sp.rescored(model, _ids(n), blended)
    assert again.context_pass.forwards == 0  # the replay is shared
    table, inv_freq = QuestionQueries.load(path).table, rope_inv_freq(model)
    moved = 0
    for i, (layer, sa, sb) in enumerate(zip(sp.cache.layers, sp.scores[name], again.scores[name], strict=True)):
        signal = question_logits(table[i], layer.keys[..., :n, :], inv_freq, n + QUESTION_LEAD)
        assert torch.equal(sb, blend_reorder(sa, signal, 0.7))
        assert torch.equal(sb.sort(-1).values, sa.sort(-1).values)  # each head keeps its scores
        moved += int((sa.argsort(-1, descending=True)[..., :20] != sb.argsort(-1, descending=True)[..., :20]).sum())
    assert moved > 0
    for strategy in ("uniform", "global"):  # the budgets do not move
        spec = BudgetSpec(0.7, strategy, None, (), 6)
        assert spec.for_context(4, n, scores=sp.scores[name]).tokens == spec.for_context(4, n, scores=again.scores[name]).tokens


def test_press_with_question_queries_ratio_zero_is_the_full_cache_and_evicts_for_real(tiny_models, tmp_path):
    model = tiny_models("qwen2")
    path = str(_queries_file(model, tmp_path / "q.safetensors"))
    ctx, question = _ids(80), _ids(6, seed=3)
    ids = torch.cat([ctx, question], dim=1)
    want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    opts = dict(prompt_ids=PROMPT, replay_chunk=30, question_queries=path, question_weight=0.5)
    full = depthkv.press(model, "kvzip_vc", 0.0, **opts)
    assert full.answer(full.compress(ctx), question, max_new_tokens=6, do_sample=False).tolist() == want.tolist()
    p = depthkv.press(model, "kvzip_vc", 0.5, head_budgets=True, **opts)
    comp = p.compress(ctx)
    assert sum(p.budgets.tokens) == 4 * 40
    assert p.answer(comp, question, max_new_tokens=4, do_sample=False).shape[1] == ids.shape[1] + 4
    with pytest.raises(ValueError, match="mode='post'"):
        depthkv.press(model, "kvzip_vc", 0.5, mode="chunked", chunk_size=32, **opts)


def test_queries_of_another_model_or_a_damaged_file_are_refused(tiny_models, tmp_path):
    llama, qwen = tiny_models("llama"), tiny_models("qwen2")
    with pytest.raises(ValueError, match="question_weight needs question_queries"):
        get_scorer("kvzip", question_weight=0.5)
    foreign = str(_queries_file(qwen, tmp_path / "qwen.safetensors", "tiny-qwen"))
    scorer = get_scorer("kvzip", prompt_ids=PROMPT, question_queries=foreign, question_weight=0.5)
    with pytest.raises(QuestionQueriesError, match="taken on 'tiny-qwen'.*record them for this model"):
        bind_scorer(scorer, llama)
    with pytest.raises(QuestionQueriesError, match="taken on"):  # press checks at construction
        depthkv.press(llama, "kvzip", 0.5, prompt_ids=PROMPT, question_queries=foreign, question_weight=0.5)
    good = (tmp_path / "qwen.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(good[: len(good) // 2])
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    from safetensors.torch import save_file
    save_file({"queries": torch.zeros(4, 4, 16)}, str(tmp_path / "other.safetensors"))  # no depthkv header
    for bad, why in (("cut", "not a readable"), ("junk", "not a readable"), ("other", "not a depthkv"),
                     ("missing", "no such")):
        with pytest.raises(QuestionQueriesError, match=why):
            QuestionQueries.load(tmp_path / f"{bad}.safetensors")
    with pytest.raises(QuestionQueriesError, match="non-finite"):
        QuestionQueries(torch.full((2, 4, 16), float("nan")))


def test_profile_keeps_question_queries_relative_to_itself(tiny_models, tmp_path, monkeypatch):
    """A profile written with an absolute queries path stores it relative to its own folder and reads it back
    absolute from wherever it is loaded; the same file given relative to the working folder is no clash."""
    model = tiny_models("llama")
    folder = tmp_path / "results"
    path = _queries_file(model, folder / "q.safetensors")
    mean = [[0.1, 0.2]] * 4
    data = {"schema_version": 1, "kind": "depthkv-profile", "model": model_identity(model, "tiny"),
            "setting": "agnostic", "probe_ratios": [0.5, 1.0],
            "scorer": {"name": "kvzip_vc", "options": {"question_queries": str(path), "question_weight": 0.5}},
            "curves": {"kl": {"mean": mean, "lo": mean, "hi": mean}}}
    Profile(data).save(folder / "profile.json")
    assert json.loads((folder / "profile.json").read_text())["scorer"]["options"]["question_queries"] == "q.safetensors"
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    for f in ("profile.json", "q.safetensors"):
        (moved / f).write_bytes((folder / f).read_bytes())
    prof = Profile.load(moved / "profile.json")
    assert prof.scorer_options["question_queries"] == str((moved / "q.safetensors").resolve())
    monkeypatch.chdir(moved)
    assert prof.options_for("kvzip_vc", {"question_queries": "q.safetensors"})["question_weight"] == 0.5
    with pytest.raises(ProfileError, match="question_queries"):
        prof.options_for("kvzip_vc", {"question_queries": str(path)})


def test_cli_records_question_queries_for_the_model(tiny_llama_dir, tmp_path, capsys, single_thread):
    out = tmp_path / "q.safetensors"
    rc = main(["question-queries", "--model", str(tiny_llama_dir), "--data", "needle", "--samples", "2",
               "--context-tokens", "200", "--device", "cpu", "--out", str(out)])
    assert rc == 0 and "2 samples" in capsys.readouterr().out
    q = QuestionQueries.load(out)
    assert q.table.shape == (4, 4, 16) and q.meta["data"]["n_samples"] == 2
    assert q.meta["model"]["n_layers"] == 4 and q.meta["model"]["config_sha256"]
    rc = main(["question-queries", "--model", str(tiny_llama_dir), "--data", "nosuch", "--out", str(tmp_path / "x")])
    assert rc == 2 and "nosuch" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("folder, queries_file, shape", [
    ("qwen_gpu_4k", "question_queries_mix4k.safetensors", (28, 12, 128)),
    ("agnostic_smollm2", "question_queries_mix1k.safetensors", (30, 9, 64)),
])
def test_the_committed_profiles_find_their_question_queries(folder, queries_file, shape):
    """The profiles in docs/results calibrated with the option; each queries file sits beside its profile and was
    recorded on the model the profile was calibrated on."""
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "docs" / "results" / folder
    prof = Profile.load(folder / "profile_kvzip_vc_qdir_agnostic.json")
    options = prof.scorer_options
    assert options["question_weight"] == 0.5 and options["diversity"] == 0.5
    assert Path(options["question_queries"]) == (folder / queries_file).resolve()
    queries = QuestionQueries.load(options["question_queries"])
    queries.check_model(prof.data["model"])
    assert queries.table.shape == shape and queries.meta["data"]["n_samples"] == 64


def test_cli_refuses_question_queries_of_another_model_in_one_line(tiny_llama_dir, tiny_models, tmp_path, capsys,
                                                                   single_thread):
    foreign = _queries_file(tiny_models("qwen2"), tmp_path / "qwen.safetensors", "tiny-qwen")
    options = json.dumps({"kvzip": {"question_queries": str(foreign), "question_weight": 0.5}})
    out = tmp_path / "p.json"
    rc = main(["calibrate", "--model", str(tiny_llama_dir), "--device", "cpu", "--scorer", "kvzip", "--setting",
               "agnostic", "--samples", "2", "--context-tokens", "200", "--data", "needle", "--scorer-options",
               options, "--out", str(out)])
    err = one_error_line(capsys.readouterr().err, skip=("Loading weights", "[depthkv.models]"))
    assert rc == 2 and "taken on 'tiny-qwen'" in err and "record them for this model" in err
    assert not out.exists()


def test_calibrate_records_the_question_queries_it_needs_beside_the_profile(tiny_llama_dir, tmp_path, capsys,
                                                                            single_thread):
    """No scorer named in the agnostic setting: the measured-best one, ``kvzip_vc`` with ``diversity`` and the question
    blend (an option given for it wins); ``question_weight`` without a file: calibrate records one from its own
    samples, next to the profile, and the profile names it relative to itself."""
    out = tmp_path / "prof" / "p.json"
    options = json.dumps({"kvzip_vc": {"diversity": 0.25}})
    rc = main(["calibrate", "--model", str(tiny_llama_dir), "--device", "cpu", "--setting", "agnostic",
               "--samples", "2", "--context-tokens", "200", "--data", "needle", "--no-proxy",
               "--permutations", "20", "--scorer-options", options, "--out", str(out)])
    assert rc == 0 and "written to" in capsys.readouterr().out
    sidecar = tmp_path / "prof" / "p.queries.safetensors"
    saved = json.loads(out.read_text())["scorer"]
    assert saved["name"] == "kvzip_vc"
    assert saved["options"] == {"diversity": 0.25, "question_weight": 0.5, "question_queries": "p.queries.safetensors"}
    queries = QuestionQueries.load(sidecar)
    assert queries.meta["data"]["n_samples"] == 2 and queries.table.shape == (4, 4, 16)
    assert Profile.load(out).scorer_options["question_queries"] == str(sidecar.resolve())


def _sharded_blend_worker(rank: int, port: int, path: str, scores, keys, values, inv_freq, out: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:  # each rank holds one of the two KV heads (and its two query heads), as under tensor parallelism
        scorer = get_scorer("kvzip", prompt_ids=PROMPT, question_queries=path, question_weight=1.0)
        got = scorer.finish(scores[:, rank:rank + 1], keys[:, rank:rank + 1], values[:, rank:rank + 1], layer_idx=1,
                            inv_freq=inv_freq, position=40, group=dist.group.WORLD)
        torch.save(got, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="torch.distributed with the gloo backend is not available in this build")
def test_question_blend_over_sharded_heads_equals_the_single_process_one(tiny_models, tmp_path):
    import socket

    import torch.multiprocessing as mp

    model = tiny_models("llama")
    path = str(_queries_file(model, tmp_path / "q.safetensors"))
    g = torch.Generator().manual_seed(3)
    scores, keys, values = torch.rand(1, 2, 40, generator=g), torch.randn(1, 2, 40, 16, generator=g), torch.randn(1, 2, 40, 16, generator=g)
    inv_freq = rope_inv_freq(model)
    want = get_scorer("kvzip", prompt_ids=PROMPT, question_queries=path, question_weight=1.0).finish(
        scores, keys, values, layer_idx=1, inv_freq=inv_freq, position=40)
    assert not torch.equal(want, scores)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_sharded_blend_worker, args=(port, path, scores, keys, values, inv_freq, str(tmp_path)),
                       nprocs=2, start_method="spawn")
    for rank in range(2):
        assert torch.equal(torch.load(tmp_path / f"rank{rank}.pt"), want[:, rank:rank + 1])
