"""Evaluation layer: one prefill per (sample, setting), full-config rows, resumption, summaries, report.

Everything runs on a tiny random Llama and a byte-level BPE trained in-process (no downloads).
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from depthkv.calibration.stats import bootstrap_ci, paired_diff_ci
from depthkv.eval import EvalConfig, EvalError, build_report, load_rows, row_key, run_eval, summarise
from depthkv.eval.results import ResultsWriter, cell_key
from depthkv.eval.summary import verdict, write_summary
from tests.conftest import tiny_loaded_model, trained_bpe_tokenizer

VOLATILE = ("seconds", "prefill_seconds")


@pytest.fixture(scope="module")
def tokenizer():
    return trained_bpe_tokenizer()


@pytest.fixture(scope="module")
def lm(tokenizer):
    return tiny_loaded_model(tokenizer)


def fake_profile(lm, path, sample_ids=()):
    """A schema-valid profile for the tiny model: layer 1 is the sensitive one."""
    from depthkv.allocation.profile import KIND, SCHEMA_VERSION
    from depthkv.models import model_identity

    mean = [[0.01, 0.03], [0.4, 0.9], [0.02, 0.05], [0.05, 0.1]]
    data = {
        "schema_version": SCHEMA_VERSION, "kind": KIND, "model": model_identity(lm.model, lm.name),
        "probe_ratios": [0.5, 1.0], "scorer": {"name": "snapkv"}, "protection": {"n_sink": 4, "n_recent": 16},
        "curves": {"kl": {"mean": mean, "lo": mean, "hi": mean}},
        "proxy": {"note": "fake"}, "infonce_per_layer": [2.0, 0.5, 1.5, 1.0],
        "data": {"description": "fake calibration", "n_samples": 2, "tasks": ["needle"],
                 "sample_ids": list(sample_ids) or ["needle/calib/s0/00000-deadbeef"]},
    }
    path.write_text(json.dumps(data))
    return path


def config(tmp_path, lm, **kw) -> EvalConfig:
    base = dict(model="tiny-llama", tasks=("needle", "vartrack"), methods=("full", "uniform", "pyramid", "optimal"),
                scorers=("snapkv", "h2o"), ratios=(0.3, 0.6), samples=2, context_tokens=320,
                settings=("aware", "agnostic"), profile=str(fake_profile(lm, tmp_path / "profile.json")),
                max_new_tokens=4, force_profile=True)  # the snapkv/aware profile serves every grid cell here
    base.update(kw)
    return EvalConfig(**base)


def strip(rows):
    return {row_key(r): {k: v for k, v in r.items() if k not in VOLATILE} for r in rows}


# ------------------------------------------------------------------------------------------ runner


def test_one_prefill_per_sample_and_setting(tmp_path, lm):
    """Every (method, scorer, ratio) of a (sample, setting) is served by one prefill of the prefix length."""
    prefills: list[int] = []

    def hook(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        ids = kwargs.get("input_ids", args[0] if args else None)
        if cache is None or cache.get_seq_length() == 0:
            prefills.append(int(ids.shape[1]))

    handle = lm.model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        cfg = config(tmp_path, lm)
        res = run_eval(lm, cfg, tmp_path / "run", progress=False)
    finally:
        handle.remove()
    n_pairs = 2 * 2 * 2  # tasks x samples x settings
    assert res.prefills == n_pairs
    assert len(prefills) == n_pairs
    expected = Counter({(r["sample_id"], r["setting"]): r["context_len"] for r in res.rows}.values())
    assert Counter(prefills) == expected
    cells_per_pair = 1 + 3 * 2 * 2  # full + methods x scorers x ratios
    assert len(res.rows) == n_pairs * cells_per_pair
    assert len({row_key(r) for r in res.rows}) == len(res.rows)


def test_rows_carry_the_full_configuration(tmp_path, lm):
    import depthkv
    from depthkv.allocation import global_budget
    from depthkv.models import model_identity
    from depthkv.models.hashing import sha256_file

    cfg = config(tmp_path, lm, tasks=("needle",), ratios=(0.5,), settings=("aware",), scorers=("snapkv",))
    res = run_eval(lm, cfg, tmp_path / "run", progress=False)
    ident = model_identity(lm.model, lm.name)
    c = lm.model.config
    per_token = 2 * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 4  # K+V, float32
    for r in res.rows:
        assert r["status"] == "ok"
        assert r["model"] == {"name": "tiny-llama", "config_sha256": ident["config_sha256"], "n_layers": 4}
        assert r["task"] == "needle" and r["sample_id"].startswith("needle/eval/")
        assert r["setting"] == "aware" and r["version"] == depthkv.__version__ and r["seed"] == 0
        assert r["profile"] == {"path": cfg.profile, "sha256": sha256_file(cfg.profile)}
        assert isinstance(r["output"], str) and isinstance(r["metrics"], dict)
        assert r["score"] == r["metrics"][r["primary"]]
        assert r["seconds"] >= 0 and r["prefill_seconds"] > 0
        assert {"depth", "length"} <= set(r["sample_meta"])
        n = r["context_len"]
        assert r["kv_bytes_kept"] == sum(r["budgets"]) * per_token
        assert r["kv_bytes_full"] == 4 * n * per_token
        if r["method"] == "full":
            assert r["scorer"] is None and r["ratio"] == 0.0 and r["budgets"] == [n] * 4 and r["kv_share"] == 1.0
        else:
            assert r["scorer"] == "snapkv" and r["ratio"] == 0.5
            assert sum(r["budgets"]) == global_budget(4, n, 0.5)
    budgets = {r["method"]: r["budgets"] for r in res.rows if r["method"] != "full"}
    assert budgets["optimal"] != budgets["uniform"]  # the profile's sensitive layer 1 gets more
    assert budgets["optimal"][1] > budgets["uniform"][1]
    cfg_file = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg_file["run"]["ratios"] == [0.5] and cfg_file["model"]["config_sha256"] == ident["config_sha256"]
    assert cfg_file["command"].startswith("depthkv eval --model tiny-llama")


def test_batched_fast_decode_gives_the_rows_of_per_cell_generate(tmp_path, lm):
    """--decode fast (a sample's cells decoded together on the fixed-shape path, 3 at a time here so groups
    split the grid) writes the same outputs, scores and bytes as model.generate per cell."""
    kw = dict(tasks=("needle",), methods=("full", "uniform", "optimal", "uniform+heads"), max_new_tokens=8,
              settings=("aware", "agnostic"))
    hf = run_eval(lm, config(tmp_path, lm, decode="hf", **kw), tmp_path / "hf", progress=False)
    fast = run_eval(lm, config(tmp_path, lm, decode="fast", decode_batch=3, **kw), tmp_path / "fast",
                    progress=False)
    assert {r["decode"] for r in hf.rows} == {"hf"} and {r["decode"] for r in fast.rows} == {"fast"}
    assert len(fast.rows) == len(hf.rows) == 2 * 2 * (1 + 3 * 2 * 2)
    volatile = (*VOLATILE, "decode")
    drop = lambda rows: {k: {f: v for f, v in r.items() if f not in volatile} for k, r in strip(rows).items()}  # noqa: E731
    assert drop(fast.rows) == drop(hf.rows)
    assert len({r["output"] for r in fast.rows}) > 2  # the answers differ between cells: the check has teeth
    with pytest.raises(EvalError, match="--decode"):
        config(tmp_path, lm, decode="beam").validate()


@pytest.mark.parametrize("setting", ["aware", "agnostic"])
def test_cells_of_several_samples_share_a_fast_batch(tmp_path, lm, monkeypatch, setting):
    """Few cells per sample: the fast path decodes the cells of consecutive samples (same task) as one batch
    (each cache feeding its last token, or its whole question after a query-agnostic compression), and every
    row, summarise's full-cache reference included, is that of model.generate per cell; a new task starts a new
    batch."""
    from depthkv.engine import static

    sizes: list[int] = []
    real = static.fast_generate_rows

    def spy(model, caches, *a, **k):
        sizes.append(len(caches))
        return real(model, caches, *a, **k)

    monkeypatch.setattr(static, "fast_generate_rows", spy)
    kw = dict(tasks=("needle", "summarise"), methods=("full", "uniform", "optimal"), scorers=("snapkv",),
              ratios=(0.6,), samples=3, settings=(setting,), max_new_tokens=None)
    hf = run_eval(lm, config(tmp_path, lm, decode="hf", **kw), tmp_path / "hf", progress=False)
    fast = run_eval(lm, config(tmp_path, lm, decode="fast", decode_batch=7, **kw), tmp_path / "fast",
                    progress=False)
    # per task, 3 samples x 3 cells, decode groups of 7 // 3 = 2 samples: samples 1 and 2 together, then 3
    assert sizes == [6, 3] * 2
    volatile = (*VOLATILE, "decode")
    drop = lambda rows: {k: {f: v for f, v in r.items() if f not in volatile} for k, r in strip(rows).items()}  # noqa: E731
    assert drop(fast.rows) == drop(hf.rows)
    assert [r["sample_id"] for r in fast.rows] == [r["sample_id"] for r in hf.rows]  # same order
    assert len({r["output"] for r in fast.rows if r["task"] == "needle"}) > 1  # the check has teeth


class Interrupt(Exception):
    pass


def interrupt_after(k: int):
    seen = []

    def on_row(row):
        seen.append(row)
        if len(seen) >= k:
            raise Interrupt

    return on_row


def test_resume_after_interruptions_matches_uninterrupted(tmp_path, lm):
    cfg = config(tmp_path, lm, tasks=("needle", "summarise"), scorers=("snapkv",), max_new_tokens=6)
    whole = run_eval(lm, cfg, tmp_path / "whole", progress=False)
    folder = tmp_path / "resumed"
    with pytest.raises(Interrupt):
        run_eval(lm, cfg, folder, progress=False, on_row=interrupt_after(5))
    assert len(load_rows(folder)) == 5
    with pytest.raises(Interrupt):  # killed again, mid (sample, setting): cells after a summarise 'full'
        run_eval(lm, cfg, folder, progress=False, on_row=interrupt_after(12))
    with open(folder / "results.jsonl", "a") as fh:  # a write cut off by the kill
        fh.write('{"schema": 1, "task": "needle", "sample_')
    assert len(load_rows(folder)) == 17
    res = run_eval(lm, cfg, folder, progress=False)
    assert res.skipped == 17 and res.new_rows == len(whole.rows) - 17
    assert strip(res.rows) == strip(whole.rows)
    lines = (folder / "results.jsonl").read_text().splitlines()
    assert len(lines) == len(whole.rows) and all(json.loads(x) for x in lines)
    again = run_eval(lm, cfg, folder, progress=False)  # nothing left: no prefill at all
    assert again.new_rows == 0 and again.prefills == 0
    def scores(rows):
        return [{k: v for k, v in c.items() if k != "seconds"} for c in summarise(rows)]

    assert scores(again.rows) == scores(whole.rows)


def test_infeasible_allocations_are_rows_not_crashes(tmp_path, lm):
    """0.97 leaves < 20 tokens per layer (every method); mlma-2 keeps 2 of 4 layers whole (cap 0.3)."""
    cfg = config(tmp_path, lm, tasks=("needle",), methods=("full", "uniform", "mlma-2", "optimal"),
                 scorers=("snapkv",), ratios=(0.2, 0.5, 0.97), settings=("aware",))
    res = run_eval(lm, cfg, tmp_path / "run", progress=False)
    bad = {(r["method"], r["ratio"]) for r in res.rows if r["status"] == "infeasible"}
    assert bad == {("uniform", 0.97), ("optimal", 0.97), ("mlma-2", 0.97), ("mlma-2", 0.5)}
    for r in res.rows:
        if r["status"] == "infeasible":
            assert "maximum reachable ratio" in r["error"]
            assert r["output"] is None and r["score"] is None and r["budgets"] is None
        else:
            assert r["status"] == "ok" and isinstance(r["score"], float)
    cells = summarise(res.rows)
    c = next(c for c in cells if c["method"] == "uniform" and c["ratio"] == 0.97)
    assert c["n"] == 0 and c["n_infeasible"] == 2 and c["mean"] is None
    out = build_report([tmp_path / "run"], tmp_path / "r.html")
    assert "infeasible" in out.read_text()
    res2 = run_eval(lm, cfg, tmp_path / "run", progress=False)  # infeasible cells count as done
    assert res2.new_rows == 0


def test_other_arguments_in_the_same_folder_is_an_error(tmp_path, lm):
    cfg = config(tmp_path, lm, tasks=("needle",), scorers=("snapkv",), samples=1, settings=("aware",),
                 methods=("full", "uniform"))
    run_eval(lm, cfg, tmp_path / "run", progress=False)
    other = config(tmp_path, lm, tasks=("needle",), scorers=("snapkv",), samples=1, settings=("aware",),
                   methods=("full", "uniform"), ratios=(0.3, 0.7))
    with pytest.raises(EvalError, match=r"other arguments(.|\n)*ratios"):
        run_eval(lm, other, tmp_path / "run", progress=False)
    res = run_eval(lm, other, tmp_path / "run", progress=False, force=True)
    assert res.skipped == 0 and {r["ratio"] for r in res.rows} == {0.0, 0.3, 0.7}
    backups = list((tmp_path / "run").glob("replaced-*/results.jsonl"))
    assert len(backups) == 1 and len(load_rows(backups[0])) == 3


def test_changed_profile_content_is_a_different_run(tmp_path, lm):
    cfg = config(tmp_path, lm, tasks=("needle",), scorers=("snapkv",), samples=1, settings=("aware",),
                 methods=("uniform", "optimal"), ratios=(0.5,))
    run_eval(lm, cfg, tmp_path / "run", progress=False)
    prof = json.loads((tmp_path / "profile.json").read_text())
    prof["curves"]["kl"]["mean"][2] = [0.9, 0.95]
    (tmp_path / "profile.json").write_text(json.dumps(prof))
    with pytest.raises(EvalError, match="profile_sha256"):
        run_eval(lm, cfg, tmp_path / "run", progress=False)


def test_validation_errors(tmp_path, lm):
    with pytest.raises(EvalError, match="need --profile"):
        EvalConfig(methods=("full", "optimal"), profile=None).validate()
    with pytest.raises(EvalError, match="unknown method"):
        EvalConfig(methods=("full", "bogus")).validate()
    with pytest.raises(EvalError, match="unknown scorer"):
        EvalConfig(methods=("uniform",), scorers=("nope",)).validate()
    with pytest.raises(EvalError, match="ratio"):
        EvalConfig(methods=("uniform",), ratios=(1.0,)).validate()
    with pytest.raises(EvalError, match="full"):
        EvalConfig(tasks=("summarise",), methods=("uniform",)).validate()
    # a calibration that saw an evaluation sample is refused
    from depthkv.tasks import generate, token_counter

    sid = generate("needle", 1, 0, context_tokens=320, count_tokens=token_counter(lm.tokenizer))[0].id
    fake_profile(lm, tmp_path / "leaky.json", sample_ids=[sid])
    cfg = config(tmp_path, lm, tasks=("needle",), samples=1, profile=str(tmp_path / "leaky.json"))
    with pytest.raises(EvalError, match="used to calibrate"):
        run_eval(lm, cfg, tmp_path / "run", progress=False)
    # a profile without InfoNCE cannot serve mga / mlma
    prof = json.loads((tmp_path / "profile.json").read_text())
    prof["infonce_per_layer"] = None
    (tmp_path / "noproxy.json").write_text(json.dumps(prof))
    cfg = config(tmp_path, lm, tasks=("needle",), samples=1, methods=("uniform", "mga"),
                 profile=str(tmp_path / "noproxy.json"))
    with pytest.raises(EvalError, match="mga"):
        run_eval(lm, cfg, tmp_path / "run2", progress=False)


def test_cli_eval_and_report(tmp_path, lm, monkeypatch, capsys):
    import depthkv.cli as cli

    monkeypatch.setattr(cli, "load", lambda args: lm)
    prof = fake_profile(lm, tmp_path / "p.json")
    args = ["eval", "--model", "tiny-llama", "--tasks", "needle", "--methods", "full,uniform,pyramid,mga",
            "--scorers", "snapkv", "--ratios", "0.4,0.8", "--samples", "2", "--context-tokens", "320",
            "--profile", str(prof), "--max-new-tokens", "3", "--out", str(tmp_path / "run"), "--no-progress"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "diff" in out and "mga" in out
    assert (tmp_path / "run" / "summary.csv").exists() and (tmp_path / "run" / "summary.json").exists()
    # same arguments again: everything resumed
    assert cli.main(args) == 0
    assert "0 new rows (14 resumed, 0 prefills)" in capsys.readouterr().out
    bad = [a if a != "0.4,0.8" else "0.5" for a in args]
    assert cli.main(bad) == 2
    assert "other arguments" in capsys.readouterr().err
    # a method that needs a profile, without one: error before any model work
    monkeypatch.setattr(cli, "load", lambda args: pytest.fail("the model must not be loaded"))
    assert cli.main(["eval", "--methods", "uniform,optimal", "--out", str(tmp_path / "x")]) == 2
    assert "--profile" in capsys.readouterr().err
    html_path = tmp_path / "rep" / "report.html"
    rows_csv = tmp_path / "rep" / "rows.csv"
    assert cli.main(["report", str(tmp_path / "run"), "-o", str(html_path), "--rows-csv", str(rows_csv)]) == 0
    lines = rows_csv.read_text().splitlines()
    assert lines[0].startswith("method,task,setting") and len(lines) == 1 + 14  # every cell, once
    text = html_path.read_text()
    for m in ("full", "uniform", "pyramid", "mga"):
        assert f">{m}<" in text
    assert "data:image/png;base64," in text
    assert (tmp_path / "rep" / "report_files").is_dir()


# ------------------------------------------------------------------------------------------ summary


def _rows(method, scores, task="needle", ratio=0.5, status="ok"):
    return [{"task": task, "sample_id": sid, "setting": "aware", "method": method, "scorer": "snapkv",
             "ratio": ratio, "status": status, "score": s, "kv_share": 0.5, "seconds": 0.1, "primary": "substring"}
            for sid, s in scores.items()]


def test_paired_difference_on_known_data(tmp_path):
    uni = {f"s{i}": v for i, v in enumerate([0, 0, 1, 1, 0, 1, 0, 0])}
    opt = {f"s{i}": v for i, v in enumerate([1, 1, 1, 1, 0, 1, 1, 0])}
    opt["only-here"] = 1.0  # unpaired: counts in the method's mean, not in the difference
    rows = _rows("uniform", uni) + list(reversed(_rows("optimal", opt)))
    cells = {c["method"]: c for c in summarise(rows, n_boot=2000, seed=3)}
    ids = sorted(uni)
    a = np.array([opt[s] for s in ids], float)
    b = np.array([uni[s] for s in ids], float)
    d = paired_diff_ci(a, b, n_boot=2000, seed=3)
    c = cells["optimal"]
    assert c["diff"] == pytest.approx(0.375) == pytest.approx(d.estimate)
    assert (c["diff_low"], c["diff_high"]) == pytest.approx((d.low, d.high))
    assert c["n_pairs"] == 8 and (c["wins"], c["ties"], c["losses"]) == (3, 5, 0)
    m = bootstrap_ci(np.array([opt[k] for k in sorted(opt)], float), n_boot=2000, seed=3)
    assert c["n"] == 9 and c["mean"] == pytest.approx(7 / 9)
    assert (c["ci_low"], c["ci_high"]) == pytest.approx((m.low, m.high))
    assert cells["uniform"]["diff"] is None and cells["uniform"]["mean"] == pytest.approx(3 / 8)
    assert 0 <= c["diff_low"] <= 0.375 <= c["diff_high"] <= 1
    # pairing is by sample id: shuffling the rows changes nothing
    assert summarise(list(reversed(rows)), n_boot=2000, seed=3) == summarise(rows, n_boot=2000, seed=3)
    # a constant difference has a degenerate interval, and a clear verdict once there are enough pairs
    const = _rows("uniform", {f"s{i}": 0.2 for i in range(6)}) + _rows("mga", {f"s{i}": 0.5 for i in range(6)})
    c = next(c for c in summarise(const) if c["method"] == "mga")
    assert (c["diff"], c["diff_low"], c["diff_high"]) == pytest.approx((0.3, 0.3, 0.3))
    assert verdict(c) == "better"
    few = _rows("uniform", {"a": 0.0, "b": 0.0}) + _rows("mga", {"a": 1.0, "b": 1.0})
    assert verdict(next(c for c in summarise(few) if c["method"] == "mga")) == "few"
    csv_path, json_path = write_summary(tmp_path, summarise(rows))
    assert "diff_low" in csv_path.read_text().splitlines()[0]
    assert json.loads(json_path.read_text())["cells"][1]["method"] == "optimal"


# ------------------------------------------------------------------------------------------ files


def test_results_file_tolerates_a_truncated_last_line(tmp_path):
    path = tmp_path / "results.jsonl"
    rows = _rows("uniform", {"a": 1.0, "b": 0.0})
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[1])[:-7])
    assert [r["sample_id"] for r in load_rows(path)] == ["a"]
    with ResultsWriter(path) as w:
        assert w.done == {row_key(rows[0])}
        w.append(rows[1])
        with pytest.raises(EvalError, match="already"):
            w.append(rows[1])
    assert [r["sample_id"] for r in load_rows(path)] == ["a", "b"]
    path.write_text(json.dumps(rows[0]) + "\n{broken\n" + json.dumps(rows[1]) + "\n")
    with pytest.raises(EvalError, match="corrupt"):
        load_rows(path)
    assert cell_key("t", "s", "aware", "full", None, 0.0) == "t|s|aware|full|-|0"


def test_report_transfer_matrix_from_folders_with_different_profiles(tmp_path, lm):
    """Two folders, same model and tasks, budgets from two profiles -> one transfer matrix per method."""
    folders = []
    for name, sensitive in (("needle-profile", 1), ("code-profile", 3)):
        path = fake_profile(lm, tmp_path / f"{name}.json")
        prof = json.loads(path.read_text())
        mean = [[0.01, 0.02] for _ in range(4)]
        mean[sensitive] = [0.5, 0.9]
        prof["curves"]["kl"] = {"mean": mean, "lo": mean, "hi": mean}
        prof["data"]["tasks"] = [name.split("-")[0]]
        path.write_text(json.dumps(prof))
        cfg = config(tmp_path, lm, tasks=("needle", "vartrack"), methods=("uniform", "optimal"),
                     scorers=("snapkv",), ratios=(0.6,), settings=("aware",), profile=str(path), samples=2)
        run_eval(lm, cfg, tmp_path / name, progress=False)
        folders.append(tmp_path / name)
    text = build_report(folders, tmp_path / "transfer.html").read_text()
    assert "Transfer matrix" in text
    assert "calibrated on needle" in text and "calibrated on code" in text
    from depthkv.eval.report import load_runs, transfer_matrices

    mats = transfer_matrices(load_runs(folders))
    assert len(mats) == 1
    _, method, cells = mats[0]
    assert method == "optimal" and sorted({c["task"] for c in cells}) == ["needle", "vartrack"] and len(cells) == 4
    assert all(c["diff_low"] <= c["diff"] <= c["diff_high"] and c["n"] == 2 for c in cells)


def test_decoder_choice_follows_the_model_family():
    """auto -> the fast path for Llama/Qwen2, model.generate for other families; an explicit fast for an
    unsupported family is refused before any work."""
    import transformers

    from depthkv.eval.runner import _decoder
    from tests.conftest import build_tiny

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64))
    assert _decoder("auto", build_tiny("qwen2")) == "fast" and _decoder("hf", build_tiny("llama")) == "hf"
    assert _decoder("auto", gpt2) == "hf"
    with pytest.raises(EvalError, match="--decode fast"):
        _decoder("fast", gpt2)


def test_scorer_options_reach_the_scorer_rows_and_command(tmp_path, lm, monkeypatch):
    """--scorer-options builds each scorer with its options, is recorded in every row and in the command, and is
    part of the run's identity (a run without options keeps the record it had before)."""
    seen = []
    from depthkv.scorers import KVzip

    class Spy(KVzip):
        def score(self, x):
            seen.append(self.self_window)
            return super().score(x)

    cfg = config(tmp_path, lm, tasks=("needle",), methods=("full", "uniform"), scorers=("kvzip",), ratios=(0.5,),
                 samples=1, settings=("agnostic",), profile=None, force_profile=False,
                 scorer_options={"kvzip": {"self_window": 1}})
    built = cfg.scorer("kvzip")
    assert built.self_window == 1 and "--scorer-options" in cfg.command_line()
    assert '{"kvzip":{"self_window":1}}' in cfg.command_line()
    assert "scorer_options" in cfg.run_record()
    assert "scorer_options" not in config(tmp_path, lm, profile=None).run_record()
    import depthkv.scorers as scorers_mod

    monkeypatch.setitem(scorers_mod.SCORERS, "kvzip", Spy)
    res = run_eval(lm, cfg, tmp_path / "run", progress=False)
    assert seen and set(seen) == {1}
    pruned = [r for r in res.rows if r["method"] == "uniform"]
    assert pruned and all(r["scorer_options"] == {"kvzip": {"self_window": 1}} for r in pruned)


@pytest.mark.parametrize("options,why", [
    ({"snapkv": {}}, "not used here: snapkv"),
    ({"kvzip": {"self_window": -1}}, "self_window"),
    ({"kvzip": {"nope": 1}}, "nope"),
    ({"kvzip": 3}, "must be an object"),
])
def test_bad_scorer_options_are_refused(tmp_path, lm, options, why):
    cfg = config(tmp_path, lm, scorers=("kvzip",), profile=None, methods=("full", "uniform"), force_profile=False,
                 scorer_options=options)
    with pytest.raises(EvalError, match=why):
        cfg.validate()
