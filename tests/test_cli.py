"""CLI: bad input gives one clear error line, exit code 2 and writes nothing; the workflows fit together.

Every command runs on a tiny random Llama (4 layers) and a byte-level tokenizer built in-process: no
downloads, each test a few seconds at most.
"""

from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

import pytest
import torch

import depthkv.cli as cli
from depthkv.allocation.budgets import BudgetError, Budgets, global_budget
from depthkv.cli import main
from tests.conftest import one_error_line as conftest_one_error_line

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
N_LAYERS = 4
PROMPT_TEXT = "The cat sat on the mat. " * 12 + "Where did the cat sit?"  # ~330 byte tokens
SHORT_TEXT = "The cat sat on the mat. " * 2 + "Where did the cat sit?"  # ~100 byte tokens


def tiny_tokenizer():
    """A byte-level BPE without merges (one token per byte) with a chat template: 260 ids, ids 0-2 as the
    tiny model's pad / bos / eos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "<|im_end|>", "<|im_start|>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="<|im_end|>",
                                  additional_special_tokens=["<|im_start|>"])
    out.chat_template = CHAT_TEMPLATE
    return out


def tiny_lm(**config):
    """A LoadedModel around a tiny random Llama and :func:`tiny_tokenizer`."""
    from depthkv.models import LoadedModel, tiny_model

    model = tiny_model("llama", n_layers=N_LAYERS, seed=0, attn_implementation="sdpa", **config)
    return LoadedModel(model=model, tokenizer=tiny_tokenizer(), name="tiny-llama", source="local",
                       load_seconds=0.0, converted=False)


@pytest.fixture(scope="module", autouse=True)
def one_thread(single_thread):
    """Tiny tensors: one thread (see conftest.single_thread)."""


@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


@pytest.fixture
def use_tiny(monkeypatch, lm):
    """Every command loads the tiny model; returns the list of model names asked for."""
    asked: list[str] = []

    def load(args):
        asked.append(args.model)
        return lm

    monkeypatch.setattr(cli, "load", load)
    return asked


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model is a test failure: the error must come before any work."""
    monkeypatch.setattr(cli, "load", lambda args: pytest.fail("the model must not be loaded"))


@pytest.fixture
def prompt(tmp_path):
    p = tmp_path / "prompt.txt"
    p.write_text(PROMPT_TEXT)
    return p


PROGRESS = ("loading model ", "loaded ", "prompt: ", "prefill", "decoded ")


def one_error_line(err: str) -> str:
    """The one line of ``err`` besides the progress lines, checked to be an error message."""
    line = conftest_one_error_line(err, start="", skip=PROGRESS)  # argparse's lines start with the command
    assert "error" in line
    return line


def run_json(args: list[str], tmp_path: Path, capsys) -> dict:
    out = tmp_path / "result.json"
    assert main([*args, "--json", str(out)]) == 0, capsys.readouterr().err
    return json.loads(out.read_text())


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("ratio", ["1.0", "-0.2", "abc"])
def test_ratio_out_of_range_is_rejected(tmp_path, prompt, ratio, capsys, no_model):
    out = tmp_path / "o.json"
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--ratio", ratio, "--prompt-file", str(prompt), "--json", str(out)])
    assert exc.value.code == 2 and not out.exists()
    assert "ratio" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("flag,value,why", [
    ("--chunk-size", "0", "must be >= 1"), ("--chunk-size", "-8", "must be >= 1"),
    ("--max-new-tokens", "0", "must be >= 1"), ("--n-sink", "-1", "must be >= 0"),
    ("--n-recent", "x", "expected an integer"), ("--context-tokens", "0", "must be >= 1"),
])
def test_bad_numbers_are_one_line_errors(tmp_path, prompt, flag, value, why, capsys, no_model):
    out = tmp_path / "o.json"
    with pytest.raises(SystemExit) as exc:
        main(["generate", flag, value, "--prompt-file", str(prompt), "--json", str(out)])
    assert exc.value.code == 2 and not out.exists()
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("depthkv generate: error: argument " + flag) and why in line and "--help" in line


@pytest.mark.parametrize("args,why", [
    (["--ratios", "0.5,abc"], "--ratios must be numbers, got 'abc'"),
    (["--tasks", " , "], "--tasks is empty"),
    (["--task-options", "{bad"], "--task-options must be a JSON object"),
    (["--task-options", '{"needle": 3}'], "--task-options must map task names to objects"),
    (["--scorer-options", "[1]"], "--scorer-options must be a JSON object"),
    (["--scorers", "kvzip", "--scorer-options", '{"kvzip_v": {}}'], "not used here: kvzip_v"),
    (["--scorers", "kvzip_v", "--scorer-options", '{"kvzip_v": {"value_weight": -1}}'], "value_weight >= 0"),
])
def test_eval_list_arguments_are_one_line_errors(tmp_path, args, why, capsys, no_model):
    out = tmp_path / "run"
    assert main(["eval", *args, "--out", str(out)]) == 2
    assert why in one_error_line(capsys.readouterr().err) and not out.exists()


def test_unknown_scorer_is_rejected(prompt, capsys, no_model):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--scorer", "nope", "--prompt-file", str(prompt)])
    assert exc.value.code == 2 and "invalid choice" in one_error_line(capsys.readouterr().err)


def test_builtin_prompt_too_short(tmp_path, capsys, use_tiny):
    out = tmp_path / "o.json"
    assert main(["generate", "--builtin", "--context-tokens", "10", "--json", str(out)]) == 2
    assert "--context-tokens 10 is too short" in one_error_line(capsys.readouterr().err) and not out.exists()


def test_budget_vector_of_wrong_length(tmp_path, prompt, capsys, use_tiny):
    b = tmp_path / "b.json"
    b.write_text(json.dumps({"tokens": [50, 50], "context_len": 100}))
    out = tmp_path / "o.json"
    rc = main(["generate", "--budgets", str(b), "--prompt-file", str(prompt), "--json", str(out)])
    assert rc == 2 and not out.exists()
    assert f"2 entries but the model has {N_LAYERS} layers" in one_error_line(capsys.readouterr().err)


def test_budget_below_protected_window(tmp_path, prompt, capsys, use_tiny):
    out = tmp_path / "o.json"
    rc = main(["generate", "--ratio", "0.99", "--prompt-file", str(prompt), "--json", str(out)])
    assert rc == 2 and not out.exists()
    assert "at least 20" in one_error_line(capsys.readouterr().err)


def test_context_shorter_than_protected_window(tmp_path, capsys, use_tiny):
    p = tmp_path / "short.txt"
    p.write_text("Hi")
    out = tmp_path / "o.json"
    rc = main(["generate", "--ratio", "0.5", "--n-recent", "200", "--prompt-file", str(p), "--json", str(out)])
    assert rc == 2 and not out.exists()
    assert "shorter than the protected window" in one_error_line(capsys.readouterr().err)


def test_empty_prompt_and_missing_profile(tmp_path, capsys, use_tiny):
    p = tmp_path / "empty.txt"
    p.write_text("  \n")
    assert main(["generate", "--prompt-file", str(p)]) == 2
    assert "empty" in one_error_line(capsys.readouterr().err)
    rc = main(["generate", "--profile", str(tmp_path / "none.json"), "--prompt-file", str(p)])
    assert rc == 2 and "none.json" in one_error_line(capsys.readouterr().err)


def test_json_path_checked_before_any_work(tmp_path, prompt, capsys, no_model):
    for bad, why in ((tmp_path / "missing" / "o.json", "does not exist"), (tmp_path, "is a folder")):
        assert main(["generate", "--prompt-file", str(prompt), "--json", str(bad)]) == 2
        assert why in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "missing").exists()


def test_calibrate_data_checked_before_loading(tmp_path, capsys, no_model):
    out = tmp_path / "p.json"
    base = ["calibrate", "--samples", "2", "--out", str(out)]
    assert main([*base, "--data", "needles"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "unknown calibration data 'needles'" in line and "needle" in line and "mix" in line
    bad = tmp_path / "rows.jsonl"
    bad.write_text(json.dumps({"context": "a b c", "question": "q?", "answer": "a"}) + "\n{not json\n")
    assert main([*base, "--data", str(bad)]) == 2
    assert f"{bad}:2: invalid JSON" in one_error_line(capsys.readouterr().err)
    assert main([*base, "--data", str(tmp_path / "none.jsonl")]) == 2
    assert "no such file" in one_error_line(capsys.readouterr().err)
    assert not out.exists()


@pytest.mark.parametrize("options,why", [
    ("{bad", "--scorer-options must be a JSON object"),
    ('{"snapkv": {}}', "not used here: snapkv"),
    ('{"kvzip": {"self_window": -2}}', "self_window"),
    ('{"kvzip": [1]}', "must be an object"),
])
def test_calibrate_scorer_options_checked_before_loading(tmp_path, capsys, no_model, options, why):
    out = tmp_path / "p.json"
    rc = main(["calibrate", "--samples", "2", "--scorer", "kvzip", "--scorer-options", options, "--out", str(out)])
    assert rc == 2 and why in one_error_line(capsys.readouterr().err) and not out.exists()


def test_allocate_needs_profile_for_optimal(capsys):
    rc = main(["allocate", "--layers", "30", "--ratio", "0.6", "--strategy", "optimal"])
    assert rc == 2 and "profile" in one_error_line(capsys.readouterr().err)
    assert main(["allocate", "--layers", "30", "--ratio", "0.6", "--strategy", "pyramid"]) == 0


def test_stdin_prompt_says_how_to_end_it(monkeypatch, capsys, use_tiny):
    monkeypatch.setattr(sys, "stdin", io.StringIO(PROMPT_TEXT))  # not a tty
    assert main(["generate", "--max-new-tokens", "2"]) == 0
    err = capsys.readouterr().err
    assert cli.STDIN_HINT in err and "Ctrl-D" in err and "--builtin" in err
    assert "prompt: stdin, " in err


# ------------------------------------------------------------------------------------------ generate


def test_chunk_size_one_prunes_every_token(tmp_path, capsys, use_tiny, lm):
    """Chunked prefill with one-token chunks prunes like any other chunk size; the printed bytes are those of
    the cache handed to decoding (every layer at its budget)."""
    short = tmp_path / "short.txt"
    short.write_text(SHORT_TEXT)
    args = ["generate", "--prompt-file", str(short), "--ratio", "0.6", "--max-new-tokens", "2"]
    res = run_json([*args, "--chunk-size", "1"], tmp_path, capsys)
    n = res["context_tokens"]
    assert n == res["prompt_tokens"] - 1
    budgets = res["budgets"]["tokens"]
    assert sum(budgets) == global_budget(N_LAYERS, n, 0.6)
    per_token = res["kv_bytes_full"] // (N_LAYERS * n)  # bytes of one token in one layer (all KV heads)
    assert res["kv_bytes_kept"] == sum(budgets) * per_token
    assert res["kv_bytes_kept"] / res["kv_bytes_full"] == pytest.approx(0.4, abs=0.01)
    assert "share kept: " in capsys.readouterr().out


@pytest.mark.parametrize("chunk", [1, 2, 7])
def test_every_chunk_ends_at_the_budget(lm, chunk):
    """Including a last chunk of a single token (N = 57 = 8 * 7 + 1 with C = 7, N odd with C = 2)."""
    import depthkv
    from depthkv.engine import chunked_prefill, kv_bytes, layer_lengths

    ids = torch.randint(3, 200, (1, 57), generator=torch.Generator().manual_seed(0))
    with depthkv.press(lm.model, "h2o", ratio=0.6, mode="chunked", chunk_size=chunk) as p:
        cache, _ = chunked_prefill(lm.model, p.session, ids, chunk)
    assert layer_lengths(cache) == list(p.budgets.tokens)
    assert p.session.kept_kv_bytes == kv_bytes(cache)
    assert p.session.plan.context_len is None  # later forwards (decoding) are not chunks


def test_prompt_longer_than_context_window(tmp_path, prompt, monkeypatch, capsys):
    small = tiny_lm(max_position_embeddings=128)
    monkeypatch.setattr(cli, "load", lambda args: small)
    out = tmp_path / "o.json"
    args = ["generate", "--prompt-file", str(prompt), "--max-new-tokens", "8", "--json", str(out)]
    assert main(args) == 2 and not out.exists()
    line = one_error_line(capsys.readouterr().err)
    assert "context window of 128 tokens" in line and "--truncate left" in line
    assert main([*args, "--truncate", "left"]) == 0
    err = capsys.readouterr().err
    assert "dropped its first" in err and "prompt: " in err and "120 tokens" in err
    res = json.loads(out.read_text())
    assert res["prompt_tokens"] == 120  # window minus the new tokens: the end of the prompt is kept


def test_progress_on_stderr(tmp_path, prompt, capsys, use_tiny):
    assert main(["generate", "--prompt-file", str(prompt), "--chunk-size", "64", "--max-new-tokens", "3"]) == 0
    cap = capsys.readouterr()
    err = cap.err
    order = [err.index(s) for s in ("loading model", "loaded tiny-llama", "prompt: ", "prefill + pruning",
                                    "prefill done in", "decoded 3 new tokens")]
    assert order == sorted(order)
    assert re.search(r"prompt: .*prompt\.txt, [\d,]+ tokens", err)
    assert "prefill" not in cap.out and "KV bytes" in cap.out  # stdout: the answer and the KV line only


# ------------------------------------------------------------------------------------------ budgets files


def test_allocate_then_generate_on_any_prompt_length(tmp_path, prompt, capsys, use_tiny):
    b = tmp_path / "b.json"
    assert main(["allocate", "--layers", str(N_LAYERS), "--ratio", "0.6", "--strategy", "pyramid",
                 "--context-tokens", "4096", "--out", str(b)]) == 0
    data = json.loads(b.read_text())
    assert len(data["shares"]) == N_LAYERS and data["min_tokens"] == 20
    capsys.readouterr()
    res = run_json(["generate", "--budgets", str(b), "--prompt-file", str(prompt), "--max-new-tokens", "2"],
                   tmp_path, capsys)
    n = res["context_tokens"]
    assert n != 4096 and res["budgets"]["context_len"] == n
    tokens = res["budgets"]["tokens"]
    assert sum(tokens) == global_budget(N_LAYERS, n, 0.6) and min(tokens) >= 20
    # pyramid: more tokens low, fewer high, as in the file
    assert tokens == sorted(tokens, reverse=True) and tokens[0] > tokens[-1]


def test_budget_shares_rescale_exactly():
    shares_src = Budgets((4000, 2000, 1000, 500, 100, 20), 4096, ratio=0.7, strategy="optimal", protected=(),
                         min_tokens=20)
    b = Budgets.from_dict(json.loads(json.dumps(shares_src.to_dict())))
    assert b == shares_src and b.shares is not None
    for n in (100, 333, 1024, 4095, 9999):
        r = b.for_context(n)
        assert r.context_len == n and r.total == global_budget(6, n, 0.7)
        assert min(r.tokens) >= 20 and max(r.tokens) <= n
        assert list(r.tokens) == sorted(r.tokens, reverse=True)  # the order of the shares survives
        # layers not held at the floor or the cap get their share of what is left, to within one token
        held = [i for i, t in enumerate(r.tokens) if t in (20, n)]
        free = [i for i in range(6) if i not in held]
        left = r.total - sum(r.tokens[i] for i in held)
        weight = sum(b.shares[i] for i in free)
        for i in free:
            assert abs(r.tokens[i] - left * b.shares[i] / weight) < 1
    assert 20 in b.for_context(100).tokens  # the floor binds on short prompts
    assert b.for_context(4096) is b
    # protected layers stay whole at any length
    p = Budgets.from_dict({**shares_src.to_dict(), "tokens": [4096, 2000, 1000, 500, 100, 20],
                           "shares": None, "protected": [0]})
    p = Budgets(p.tokens, p.context_len, 0.5, "optimal", (0,), tuple(t / 4096 for t in p.tokens), 20)
    r = p.for_context(700)
    assert r.tokens[0] == 700 and r.total == global_budget(6, 700, 0.5)


def test_old_budget_files_keep_fixed_length(tmp_path):
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"tokens": [300, 200, 100, 50], "context_len": 400, "ratio": 0.625,
                               "strategy": "optimal", "protected": []}))
    b = Budgets.load(old)
    assert b.shares is None and b.for_context(400) is b
    with pytest.raises(BudgetError, match="400-token context, the prompt has 500 tokens"):
        b.for_context(500)
    for bad in ({"tokens": [1, 2], "context_len": 4, "shares": [0.5]}, {"tokens": "ab", "context_len": 4},
                {"tokens": [1, 2], "context_len": 4, "shares": [0.5, 2.0]}):
        with pytest.raises(BudgetError):
            Budgets.from_dict(bad)
    with pytest.raises(BudgetError, match="cannot be applied to a 30-token context"):
        Budgets((20, 20), 100, 0.8, "optimal", (), (0.2, 0.2), 20).for_context(30)  # 12 tokens < 2 x 20


# ------------------------------------------------------------------------------------------ help


def test_help_has_a_purpose_and_an_example(capsys):
    for name in cli.COMMANDS:
        with pytest.raises(SystemExit) as exc:
            main([name, "--help"])
        assert exc.value.code == 0
        text = capsys.readouterr().out
        assert f"depthkv {name}" in text.split("example:", 1)[-1], f"{name}: no example in --help"
        doc = (cli.COMMANDS[name][1].__doc__ or "").strip()
        assert doc and doc.splitlines()[0][:40] in " ".join(text.split())
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    assert "Typical workflow" in top and "calibrate" in top and "report" in top
    assert "only module that knows" not in top


# ------------------------------------------------------------------------------------------ eval / report


EVAL = ["eval", "--model", "tiny-llama", "--tasks", "needle", "--methods", "full,uniform", "--scorers", "snapkv",
        "--ratios", "0.5", "--samples", "2", "--context-tokens", "160", "--max-new-tokens", "2", "--no-progress"]


def test_eval_error_leaves_no_folder(tmp_path, capsys, use_tiny):
    out = tmp_path / "runs" / "e1"
    bad = [a if a != "160" else "10" for a in EVAL]  # too short for a needle: fails after the folder is made
    assert main([*bad, "--out", str(out)]) == 2
    assert "leaves no room for a haystack" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "runs").exists()


def test_eval_force_error_restores_the_old_results(tmp_path):
    from depthkv.eval.results import CONFIG, RESULTS, cleanup_on_error, prepare_folder

    folder = tmp_path / "run"
    folder.mkdir()
    (folder / CONFIG).write_text(json.dumps({"run": {"a": 1}}))
    (folder / RESULTS).write_text(json.dumps({"task": "t"}) + "\n")
    with pytest.raises(RuntimeError), cleanup_on_error(folder):
        prepare_folder(folder, {"a": 2}, force=True)
        (folder / CONFIG).write_text(json.dumps({"run": {"a": 2}}))
        (folder / RESULTS).write_text("")
        raise RuntimeError("failed before the first row")
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG, RESULTS]
    assert json.loads((folder / CONFIG).read_text()) == {"run": {"a": 1}}
    # once a row is written the folder is a resumable run: kept as it is
    with pytest.raises(KeyboardInterrupt), cleanup_on_error(tmp_path / "new"):
        (tmp_path / "new").mkdir()
        (tmp_path / "new" / RESULTS).write_text(json.dumps({"task": "t"}) + "\n")
        raise KeyboardInterrupt
    assert (tmp_path / "new" / RESULTS).exists()


@pytest.fixture
def partial_run(tmp_path, capsys, use_tiny):
    out = tmp_path / "runs" / "e1"
    assert main([*EVAL, "--out", str(out)]) == 0
    capsys.readouterr()
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 4  # 2 samples x (full + uniform)
    (out / "results.jsonl").write_text("\n".join(lines[:3]) + "\n")
    (tmp_path / ".git").mkdir()  # the report is inside a repository: paths are shown relative to it
    return out


def test_report_on_partial_run(partial_run, tmp_path, capsys):
    html_path = tmp_path / "rep" / "report.html"
    assert main(["report", str(partial_run), "-o", str(html_path)]) == 0
    err = capsys.readouterr().err
    assert re.search(r"warning: .*e1: 1 of 4 cells are missing", err)
    text = html_path.read_text()
    assert "class=warn" in text and "1 of 4 cells missing" in text
    # commands with repository-relative paths
    pre = re.findall(r"<pre>(.*?)</pre>", text, re.S)
    assert pre and "--out runs/e1" in pre[0] and str(tmp_path) not in pre[0]
    assert str(tmp_path) not in text
    # every figure links to its full-size PNG beside the report
    links = re.findall(r"<a href='(report_files/[^']+\.png)' target=_blank title", text)
    assert links and len(links) == text.count("<img ")
    assert all((html_path.parent / link).is_file() for link in links)


def test_budgets_plot_starts_at_zero(monkeypatch, tmp_path):
    import matplotlib.pyplot as plt

    from depthkv.eval.report import budget_ylim, plot_budgets

    figs = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figs.append(fig))
    rows = [{"status": "ok", "method": "uniform", "ratio": 0.6, "context_len": 1000,
             "budgets": [400, 400, 401, 400 - (i % 2)]} for i in range(2)]
    assert plot_budgets(rows, tmp_path / "b.png", "t").is_file()
    lo, hi = figs[0].axes[0].get_ylim()
    assert lo == 0.0 and hi == pytest.approx(budget_ylim(0.401)[1]) and hi >= 0.401
    assert budget_ylim(1.0) == (0.0, pytest.approx(1.08))


def test_calibrate_refuses_data_that_cannot_fill_the_context_in_one_line(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "p.json"
    rc = main(["calibrate", "--model", str(tiny_llama_dir), "--device", "cpu", "--data", "mix", "--samples", "5",
               "--context-tokens", "300", "--out", str(out)])
    err = conftest_one_error_line(capsys.readouterr().err, skip=("Loading weights", "[depthkv.models]"))
    assert rc == 2 and "leaves no room" in err and not out.exists()
