"""Compressed contexts: compress outside ``with``, save/load as safetensors files, the compress/ask CLI.

Tiny random models (float32, seeded, no downloads); token ids for the engine, a byte-level tokenizer built
in-process (no training, no download) for the prompt split and the CLI.
"""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from safetensors.torch import save_file

import depthkv
from depthkv.engine import PrunedLayer, clone_cache, generate_from_cache, kv_bytes, layer_lengths
from depthkv.engine.cache import layer_from_state, layer_state
from depthkv.engine.compressed import (
    CompressedContext,
    CompressedContextError,
    CompressedContextWarning,
    profile_sha256,
    read_header,
)
from depthkv.engine.session import attention_modules
from depthkv.models.identity import model_identity
from depthkv.tasks.prompt import context_prompt_ids, encode_prompt, split_prompt
from tests.conftest import build_tiny

GEN = dict(max_new_tokens=6, do_sample=False)
PROT = dict(n_sink=2, n_recent=4)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CONTEXT = ("The lighthouse keeper wrote the passkey 48213 in the log book. Ships passed at night. "
           "The keeper's cat slept on the stairs. ")


def byte_tokenizer(chat: bool):
    """A byte-level tokenizer without merges (one token per byte), BOS added, optional ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials)}
    vocab.update({ch: len(specials) + i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>")
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="module")
def chat_tok():
    return byte_tokenizer(chat=True)


@pytest.fixture(scope="module")
def plain_tok():
    return byte_tokenizer(chat=False)


def hook_state(model) -> tuple:
    """Everything a press may attach to a model: attention implementation, hooks, wrapped generate."""
    mods = attention_modules(model)
    return (model.config._attn_implementation, sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in mods),
            any(hasattr(m, "_depthkv_session") for m in mods), "generate" in model.__dict__)


def assert_same_cache(a, b) -> None:
    assert len(a.layers) == len(b.layers)
    for x, y in zip(a.layers, b.layers):
        assert type(x) is type(y)
        assert torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values)
        assert torch.equal(x.kept_pos, y.kept_pos)
        assert (x.prefix_end, x.logical_len) == (y.prefix_end, y.logical_len)


# ------------------------------------------------------------------------------ compress outside `with`
@pytest.mark.parametrize("mode", ["post", "chunked"])
def test_compress_outside_with_prunes_and_leaves_model_unhooked(tiny_models, prompt_ids, mode):
    model = tiny_models("llama", "sdpa")
    before = hook_state(model)
    ref = model.generate(prompt_ids, **GEN)
    p = depthkv.press(model, "snapkv", ratio=0.6, mode=mode, chunk_size=32, **PROT)
    comp = p.compress(prompt_ids)  # no `with`: must still prune
    n, kept_total = prompt_ids.shape[1], round(4 * 96 * 0.4)
    assert layer_lengths(comp.cache) == list(comp.budgets.tokens) and sum(comp.budgets.tokens) == kept_total
    for layer, b in zip(comp.cache.layers, comp.budgets.tokens):
        assert isinstance(layer, PrunedLayer) and layer.get_seq_length() == n
        assert layer.keys.shape == (1, 2, b, 16) and layer.values.shape == (1, 2, b, 16)
    assert kv_bytes(comp.cache) == kept_total * 2 * 2 * 16 * 4  # K and V, 2 KV heads, head_dim 16, fp32
    assert hook_state(model) == before and not p._active
    assert torch.equal(model.generate(prompt_ids, **GEN), ref)  # the model really is back to plain
    with p:
        inside = p.compress(prompt_ids)
    assert_same_cache(comp.cache, inside.cache)
    assert hook_state(model) == before


def test_answer_outside_with_matches_inside(tiny_models, prompt_ids):
    model = tiny_models("qwen2", "sdpa")
    question = torch.tensor([[11, 12, 13, 14]])
    p = depthkv.press(model, "h2o", ratio=0.5, **PROT)
    with p:
        ref = p.answer(p.compress(prompt_ids), question, **GEN)
    before = hook_state(model)
    out = p.answer(p.compress(prompt_ids), question, **GEN)
    assert torch.equal(out, ref) and hook_state(model) == before


def test_compress_error_outside_with_still_unhooks(tiny_models):
    model = tiny_models("llama", "sdpa")
    before = hook_state(model)
    p = depthkv.press(model, "snapkv", ratio=0.5, n_sink=4, n_recent=16)
    with pytest.raises(depthkv.BudgetError, match="shorter than the protected window"):
        p.compress(torch.arange(10).reshape(1, 10))
    assert hook_state(model) == before


# ------------------------------------------------------------------------------ save / load
@pytest.mark.parametrize(("arch", "mode"), [("llama", "post"), ("qwen2", "chunked")])
def test_save_load_answer_gives_same_tokens(tiny_models, prompt_ids, tmp_path, arch, mode):
    model = tiny_models(arch, "sdpa")
    question = torch.tensor([[7, 8, 9]])
    with depthkv.press(model, "snapkv", ratio=0.7, mode=mode, chunk_size=40, **PROT) as p:
        comp = p.compress(prompt_ids)
        ref = p.answer(comp, question, **GEN)
    path = comp.save(tmp_path / "ctx.dkv")
    fresh = build_tiny(arch, "sdpa")  # another process would build the same model from the same weights
    loaded = CompressedContext.load(path, fresh)
    assert_same_cache(loaded.cache, comp.cache)
    assert torch.equal(loaded.context_ids, comp.context_ids) and torch.equal(loaded.logits, comp.logits)
    assert loaded.budgets == comp.budgets and loaded.settings == comp.settings and loaded.note is None
    assert loaded.kv_bytes() == comp.kv_bytes() and loaded.full_kv_bytes() == comp.full_kv_bytes()
    p2 = depthkv.press(fresh, "snapkv", ratio=0.7, mode=mode, chunk_size=40, **PROT)
    assert torch.equal(p2.answer(loaded, question, **GEN), ref)
    assert torch.equal(p2.answer(loaded, question, **GEN), ref)  # answers work on copies
    ids = torch.cat([loaded.context_ids, question], 1)
    assert torch.equal(generate_from_cache(fresh, clone_cache(loaded.cache), ids, **GEN), ref)


def test_header_records_model_settings_and_layers(tiny_models, prompt_ids, tmp_path):
    model = tiny_models("llama", "sdpa")
    budgets = depthkv.Budgets((96, 30, 20, 10), context_len=96)
    comp = depthkv.press(model, "knorm", budgets=budgets, protected_layers=(0,), **PROT).compress(prompt_ids)
    comp.context_text = "the context"
    path = comp.save(tmp_path / "ctx.dkv")
    h = read_header(path)
    ident = model_identity(model, "x")
    assert h["model"]["config_sha256"] == ident["config_sha256"] and h["model"]["n_layers"] == 4
    assert h["kind"] == "depthkv-compressed-context" and h["schema_version"] == 1
    assert h["depthkv_version"] == depthkv.__version__ and h["dtype"] == "float32"
    assert h["budgets"]["tokens"] == [96, 30, 20, 10]
    c = h["compression"]
    assert (c["scorer"], c["n_sink"], c["n_recent"], c["protected_layers"], c["mode"]) == ("knorm", 2, 4, [0], "post")
    assert c["profile_sha256"] is None
    assert h["context"] == {"n_tokens": 96, "batch": 1, "text": "the context"}
    assert [m["kind"] for m in h["layers"]] == ["pruned"] * 4 and h["layers"][1]["logical_len"] == 96
    with open(path, "rb") as fh:  # a plain safetensors file: 8-byte little-endian header length, JSON header
        n = int.from_bytes(fh.read(8), "little")
        names = set(json.loads(fh.read(n))) - {"__metadata__"}
    assert names == {"context_ids", "logits"} | {f"layers.{i}.{t}" for i in range(4)
                                                 for t in ("keys", "values", "kept_pos")}


def test_profile_sha256_is_canonical():
    class P:
        def __init__(self, data):
            self.data = data

    assert profile_sha256(P({"a": 1, "b": [1, 2]})) == profile_sha256(P({"b": [1, 2], "a": 1}))
    assert profile_sha256(P({"a": 1})) != profile_sha256(P({"a": 2})) and profile_sha256(None) is None


@pytest.fixture
def saved(tiny_models, prompt_ids, tmp_path):
    model = tiny_models("llama", "sdpa")
    comp = depthkv.press(model, "snapkv", ratio=0.5, **PROT).compress(prompt_ids)
    return model, comp.save(tmp_path / "ctx.dkv")


def _rejected(path, model, match: str) -> str:
    with pytest.raises(CompressedContextError, match=match) as exc:
        CompressedContext.load(path, model)
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_foreign_model_is_rejected(saved, tiny_models):
    _, path = saved
    _rejected(path, tiny_models("qwen2", "sdpa"), "compressed by .* not by this model")
    _rejected(path, tiny_models("llama", "sdpa", n_layers=3), "4 layers.*3 layers")


def test_truncated_corrupt_and_foreign_files_are_rejected(saved, tmp_path):
    model, path = saved
    data = path.read_bytes()
    cases = {
        "truncated.dkv": (data[: len(data) // 2], "truncated or corrupt"),
        "stub.dkv": (data[:5], "not a readable safetensors file"),
        "flipped.dkv": (data[:-1] + bytes([data[-1] ^ 0xFF]), "checksum"),
        "text.dkv": (b"just some text, not a tensor file at all", "not a readable safetensors file"),
    }
    n = int.from_bytes(data[:8], "little")
    header_edits = {  # same-length edits of the header: the file stays a readable safetensors file or not
        "schema.dkv": (b'schema_version\\": 1', b'schema_version\\": 9', "schema 9"),
        "json.dkv": (b'{\\"kind', b'[\\"kind', "invalid JSON"),
        "layer.dkv": (b'logical_len\\": 96', b'logical_len\\": 97', "layer 0: pruned cache layer is inconsistent"),
        "dtype.dkv": (b'"dtype":"F32"', b'"dtype":"F64"', "not a readable safetensors file"),
    }
    for name, (old, new, match) in header_edits.items():
        assert old in data[8 : 8 + n], old
        cases[name] = (data[:8] + data[8 : 8 + n].replace(old, new, 1) + data[8 + n :], match)
    for name, (blob, match) in cases.items():
        (tmp_path / name).write_bytes(blob)
        _rejected(tmp_path / name, model, match)
    other = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(3)}, other)
    _rejected(other, model, "not a depthkv compressed context")
    _rejected(tmp_path / "missing.dkv", model, "does not exist")


def test_save_is_atomic(saved, tiny_models, prompt_ids, monkeypatch):
    model, path = saved
    old = path.read_bytes()
    comp = depthkv.press(model, "knorm", ratio=0.3, **PROT).compress(prompt_ids)

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        comp.save(path)
    assert path.read_bytes() == old and sorted(os.listdir(path.parent)) == ["ctx.dkv"]


def test_dtype_mismatch_is_converted_with_a_note(saved):
    _, path = saved
    bf16 = build_tiny("llama", "sdpa").to(torch.bfloat16)
    with pytest.warns(CompressedContextWarning, match="float32 and converted to the model's bfloat16"):
        comp = CompressedContext.load(path, bf16)
    assert "converted" in comp.note and comp.logits.dtype == torch.bfloat16
    assert all(layer.keys.dtype == layer.values.dtype == torch.bfloat16 for layer in comp.cache.layers)
    out = depthkv.press(bf16, "snapkv", ratio=0.5, **PROT).answer(comp, torch.tensor([[3, 4]]), **GEN)
    assert out.shape == (1, 96 + 2 + GEN["max_new_tokens"])


def test_layer_state_round_trip_and_inconsistency(tiny_models, prompt_ids):
    model = tiny_models("llama", "sdpa")
    comp = depthkv.press(model, "snapkv", ratio=0.5, **PROT).compress(prompt_ids)
    layer = comp.cache.layers[2]
    tensors, meta = layer_state(layer)
    assert set(tensors) == {"keys", "values", "kept_pos"} and meta["kind"] == "pruned"
    back = layer_from_state(tensors, meta)
    assert torch.equal(back.positions(), layer.positions()) and back.get_seq_length() == 96
    with pytest.raises(ValueError, match="inconsistent"):
        layer_from_state({**tensors, "kept_pos": tensors["kept_pos"][..., :-1]}, meta)
    with pytest.raises(ValueError, match="lacks the tensor 'kept_pos'"):
        layer_from_state({"keys": tensors["keys"], "values": tensors["values"]}, meta)
    copy = clone_cache(comp.cache)
    assert_same_cache(copy, comp.cache) and copy.layers[0].keys.data_ptr() != comp.cache.layers[0].keys.data_ptr()


# ------------------------------------------------------------------------------ prompt split (one encoder)
@pytest.mark.parametrize("chat", [True, False])
def test_split_prompt_concatenates_to_the_full_prompt(chat, chat_tok, plain_tok):
    tok = chat_tok if chat else plain_tok
    question = "What is the passkey?"
    ctx, q = split_prompt(tok, CONTEXT, question)
    if chat:
        full = tok.apply_chat_template([{"role": "user", "content": f"{CONTEXT}\n\n{question}"}],
                                       tokenize=False, add_generation_prompt=True)
        full_ids = tok(full, add_special_tokens=False)["input_ids"]
    else:
        full_ids = tok(f"Context:\n{CONTEXT}\n\nQuestion: {question}\nAnswer:")["input_ids"]
    assert ctx + q == full_ids and question not in tok.decode(ctx) and question in tok.decode(q)
    assert context_prompt_ids(tok, CONTEXT) == ctx  # what compress stores: known before the question
    aware_ctx, aware_q = split_prompt(tok, CONTEXT, question, question_in_prefill=True)
    assert aware_ctx + aware_q == full_ids and question in tok.decode(aware_ctx)


def test_encode_prompt_is_one_user_turn(chat_tok, plain_tok):
    via_template = chat_tok.apply_chat_template([{"role": "user", "content": "hi there"}], tokenize=True,
                                                add_generation_prompt=True, return_dict=False)
    assert encode_prompt(chat_tok, "hi there") == list(via_template)
    assert encode_prompt(plain_tok, "hi there") == plain_tok("hi there")["input_ids"]


# ------------------------------------------------------------------------------ CLI: compress / ask
@pytest.fixture
def cli(monkeypatch, tmp_path, chat_tok, plain_tok):
    """``depthkv`` with the model loader replaced: 'tiny' (4 layers) and 'other' (3 layers), byte tokenizer."""
    from depthkv import cli as cli_mod
    from depthkv.models.tiny import tiny_model

    calls: list[tuple[str, str]] = []
    models = {"tiny": tiny_model("llama", attn_implementation="sdpa"),
              "other": tiny_model("llama", n_layers=3, attn_implementation="sdpa")}

    def fake_load(args):
        from depthkv.models import LoadedModel

        calls.append((args.model, args.dtype))
        tok = plain_tok if getattr(args, "tokenizer", None) == "plain" else chat_tok
        model = models[args.model].to(cli_mod._dtype(args.dtype))
        return LoadedModel(model, tok, args.model, "local", 0.0, False)

    monkeypatch.setattr(cli_mod, "load", fake_load)
    ctx_file = tmp_path / "context.txt"
    ctx_file.write_text(CONTEXT)
    return cli_mod.main, ctx_file, models, calls


def _compress(main, ctx_file, out, *extra):
    """SnapKV, uniform split, one budget per layer: as ``_expected_answers``' in-memory press."""
    return main(["compress", "--model", "tiny", "--ratio", "0.5", "--scorer", "snapkv", "--strategy", "uniform",
                 "--no-head-budgets", "--n-sink", "2", "--n-recent", "4", "--context-file", str(ctx_file),
                 "--out", str(out), *extra])


def test_cli_compress_defaults_to_the_agnostic_settings(cli, tmp_path, capsys):
    """Without --scorer / --strategy / --head-budgets, compress takes the settings measured best when the
    question comes later: KVzip, the input-adaptive split (global without a profile), per-head budgets."""
    main, ctx_file, models, _ = cli
    out = tmp_path / "ctx.dkv"
    assert main(["compress", "--model", "tiny", "--ratio", "0.5", "--n-sink", "2", "--n-recent", "4",
                 "--context-file", str(ctx_file), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "scorer kvzip, strategy global, per-head budgets" in printed
    header = read_header(out)
    assert header["compression"]["scorer"] == "kvzip" and header["compression"]["head_budgets"] is True
    comp = CompressedContext.load(out, models["tiny"])
    assert comp.budgets.strategy == "global" and sum(comp.budgets.tokens) == round(4 * comp.n_tokens * 0.5)
    # per-head budgets: the padded tensors and the KV pairs really kept are both reported
    per_pair = comp.full_kv_bytes() // (4 * comp.n_tokens * 2)  # one token of one KV head in one layer (2 KV heads)
    assert comp.kv_bytes_ragged() == sum(comp.budgets.tokens) * 2 * per_pair < comp.kv_bytes()
    assert f"KV pairs really kept (per-head budgets, without padding): {comp.kv_bytes_ragged():,}" in printed


def _expected_answers(model, tok, questions, max_new_tokens) -> list[str]:
    """The in-memory path: compress the context part once, answer each question from it."""
    p = depthkv.press(model, "snapkv", ratio=0.5, **PROT)
    comp = p.compress(torch.tensor([context_prompt_ids(tok, CONTEXT)]))
    answers = []
    for question in questions:
        ctx, q = split_prompt(tok, CONTEXT, question)
        out = p.answer(comp, torch.tensor([q]), max_new_tokens=max_new_tokens, do_sample=False,
                       pad_token_id=tok.eos_token_id)
        answers.append(tok.decode(out[0, len(ctx) + len(q):], skip_special_tokens=True).strip())
    return answers


def test_cli_compress_then_ask(cli, tmp_path, capsys, chat_tok):
    main, ctx_file, models, calls = cli
    out = tmp_path / "ctx.dkv"
    assert _compress(main, ctx_file, out) == 0
    printed = capsys.readouterr().out
    comp = CompressedContext.load(out, models["tiny"])
    n = len(context_prompt_ids(chat_tok, CONTEXT))
    assert comp.n_tokens == n and f"context: {n} tokens" in printed
    assert f"{comp.full_kv_bytes():,} / {comp.kv_bytes():,}" in printed  # measured on the saved tensors
    assert comp.kv_bytes() == sum(comp.budgets.tokens) * 2 * 2 * 16 * 4 and comp.context_text == CONTEXT
    assert read_header(out)["model"]["name"] == "tiny"

    calls.clear()
    answers = tmp_path / "answers.json"
    questions = ["What is the passkey?", "Where did the cat sleep?"]
    expected = _expected_answers(models["tiny"], chat_tok, questions, 5)
    assert main(["ask", str(out), questions[0], "--max-new-tokens", "5", "--json", str(answers)]) == 0
    assert calls == [("tiny", "float32")]  # model and dtype default to the file's
    got = json.loads(answers.read_text())
    assert got["answers"][0]["answer"] == expected[0] and got["context_tokens"] == n
    assert expected[0] in capsys.readouterr().out

    qfile = tmp_path / "questions.txt"
    qfile.write_text("What is the passkey?\n\nWhere did the cat sleep?\n")
    assert main(["ask", str(out), "--questions-file", str(qfile), "--max-new-tokens", "5", "--json",
                 str(answers)]) == 0
    got = json.loads(answers.read_text())["answers"]
    assert [a["question"] for a in got] == questions and [a["answer"] for a in got] == expected


def _one_error_line(capsys, match: str) -> None:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and match in err, err


def test_cli_rejects_foreign_truncated_corrupt_and_other_files(cli, tmp_path, capsys):
    main, ctx_file, _, _ = cli
    out = tmp_path / "ctx.dkv"
    assert _compress(main, ctx_file, out) == 0
    capsys.readouterr()
    answers = tmp_path / "answers.json"
    assert main(["ask", str(out), "Who?", "--model", "other", "--json", str(answers)]) == 2
    _one_error_line(capsys, "not by this model")
    data = out.read_bytes()
    bad = {"truncated.dkv": data[: len(data) // 3], "flipped.dkv": data[:-1] + bytes([data[-1] ^ 1]),
           "text.dkv": b"hello"}
    for name, blob in bad.items():
        (tmp_path / name).write_bytes(blob)
        assert main(["ask", str(tmp_path / name), "Who?", "--json", str(answers)]) == 2
        _one_error_line(capsys, name)
    save_file({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
    assert main(["ask", str(tmp_path / "w.safetensors"), "Who?"]) == 2
    _one_error_line(capsys, "not a depthkv compressed context")
    assert not answers.exists()


def test_cli_bad_arguments_exit_2_and_write_nothing(cli, tmp_path, capsys):
    main, ctx_file, _, _ = cli
    out = tmp_path / "ctx.dkv"
    assert _compress(main, tmp_path / "missing.txt", out) == 2
    _one_error_line(capsys, "missing.txt")
    (tmp_path / "empty.txt").write_text(" \n")
    assert _compress(main, tmp_path / "empty.txt", out) == 2
    _one_error_line(capsys, "is empty")
    assert _compress(main, ctx_file, out, "--n-recent", "500") == 2  # context shorter than the window
    _one_error_line(capsys, "shorter than the protected window")
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["context.txt", "empty.txt"]
    assert _compress(main, ctx_file, out) == 0
    capsys.readouterr()
    qfile = tmp_path / "q.txt"
    qfile.write_text("Who?\n")
    assert main(["ask", str(out), "Who?", "--questions-file", str(qfile)]) == 2
    _one_error_line(capsys, "exactly one of")
    assert main(["ask", str(out)]) == 2
    _one_error_line(capsys, "exactly one of")
    with pytest.raises(SystemExit) as exc:
        main(["ask", str(out), "Who?", "--max-new-tokens", "0"])
    assert exc.value.code == 2 and "--max-new-tokens" in capsys.readouterr().err
    assert main(["ask", str(out), "Who?", "--json", str(tmp_path / "no" / "a.json")]) == 2
    _one_error_line(capsys, "does not exist")


def test_cli_ask_with_another_tokenizer_is_refused(cli, tmp_path, capsys, monkeypatch):
    main, ctx_file, _, _ = cli
    out = tmp_path / "ctx.dkv"
    assert _compress(main, ctx_file, out) == 0
    capsys.readouterr()
    import argparse

    real = argparse.ArgumentParser.parse_args

    def with_plain_tokenizer(self, *a, **kw):
        ns = real(self, *a, **kw)
        ns.tokenizer = "plain"
        return ns

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", with_plain_tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["ask", str(out), "What is the passkey?"]) == 2
    _one_error_line(capsys, "another tokenizer")


@pytest.mark.parametrize("extra, message", [
    (["--scorer", "kvzip_v"], "error: --chunk-size prunes chunk by chunk, but scorer 'kvzip_v' orders the whole "
                              "context's scores once it is replayed (drop --chunk-size)"),
    (["--scorer", "kvzip", "--scorer-options", '{"kvzip": {"consensus": 1}}'],
     "error: --chunk-size prunes chunk by chunk, but scorer 'kvzip' orders the whole context's scores once it is "
     "replayed (drop --chunk-size)"),
    (["--scorer", "snapkv", "--head-budgets"], "error: --chunk-size prunes chunk by chunk, but per-head budgets are "
                                               "split once, over the whole context's scores (drop --chunk-size)"),
])
def test_cli_compress_refuses_what_cannot_prune_chunk_by_chunk(cli, tmp_path, capsys, extra, message):
    main, ctx_file, _, _ = cli
    out = tmp_path / "ctx.dkv"
    capsys.readouterr()
    assert main(["compress", "--model", "tiny", "--ratio", "0.5", "--chunk-size", "16", *extra,
                 "--context-file", str(ctx_file), "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == message
    assert not out.exists()


def test_cli_compress_passes_scorer_options_to_the_press(cli, tmp_path, capsys, monkeypatch):
    main, ctx_file, _, calls = cli
    seen = []
    real = depthkv.press

    def spy(model, *a, **kw):
        seen.append(kw)
        return real(model, *a, **kw)

    monkeypatch.setattr(depthkv, "press", spy)
    out = tmp_path / "ctx.dkv"
    opts = '{"kvzip": {"self_window": 1, "self_weight": 0.3}}'
    assert main(["compress", "--model", "tiny", "--ratio", "0.5", "--scorer", "kvzip", "--scorer-options", opts,
                 "--n-sink", "2", "--n-recent", "4", "--context-file", str(ctx_file), "--out", str(out)]) == 0
    assert seen and seen[-1]["self_window"] == 1 and seen[-1]["self_weight"] == 0.3 and out.exists()
    assert "self_window=1, self_weight=0.3" in read_header(out)["compression"]["scorer_config"]
    n_loads = len(calls)
    bad = tmp_path / "bad.dkv"
    for options, why in (('{"snapkv": {}}', "not used here: snapkv"),
                         ('{"kvzip": {"self_weight": 2}}', "self_weight in [0, 1]")):
        capsys.readouterr()
        assert main(["compress", "--model", "tiny", "--scorer", "kvzip", "--scorer-options", options,
                     "--context-file", str(ctx_file), "--out", str(bad)]) == 2
        assert why in capsys.readouterr().err.strip().splitlines()[-1]
    assert len(calls) == n_loads and not bad.exists()  # refused before loading the model
