"""benchmarks/headline_table.py on hand-made result folders: exact retention and paired differences, the
full-cache floor, merging folders whose full-cache rows repeat, kvpress rows on their common samples, outputs
and bad input."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import headline_table as ht
import numpy as np
import pytest

from depthkv.calibration.stats import stratified_bootstrap_ci

# task -> method label -> scores of samples s0, s1, ... (ratio 0.8 unless the label says otherwise)
SCORES = {
    "alpha": {"full": [1, 1, 1, 0], "uniform/snapkv": [1, 0, 1, 0], "optimal/snapkv": [1, 1, 1, 0],
              "pyramid/snapkv": [0, 0, 1, 0]},
    "beta": {"full": [1, 1, 1, 1], "uniform/snapkv": [0, 0, 1, 1], "optimal/snapkv": [1, 0, 1, 1],
             "pyramid/snapkv": [0, 0, 0, 0]},
    "gamma": {"full": [0, 0, 0, 0], "uniform/snapkv": [1, 1, 1, 1], "optimal/snapkv": [0, 0, 0, 0],
              "pyramid/snapkv": [1, 1, 1, 1]},  # the full cache fails: excluded at the default floor
}
N_BOOT = ["--n-boot", "200"]


def write_run(folder: Path, scores: dict, *, kind: str = "depthkv-eval", model: str = "tiny", ratio: float = 0.8,
              created: str | None = "2026-01-02T03:04:05+00:00", setting: str = "aware") -> Path:
    """A results folder as ``depthkv eval`` (or kvpress_agnostic.py with kind="kvpress-agnostic") writes it."""
    folder.mkdir(parents=True)
    if kind.startswith("kvpress"):
        config = {"kind": kind, "model": model, "context_tokens": 64, "dtype": "auto"}
    else:
        config = {"kind": kind, "run": {"context_tokens": 64, "dtype": "float32", "samples": 4},
                  "model": {"name": model}, "created": created, "command": f"depthkv eval --out {folder.name}"}
    (folder / "config.json").write_text(json.dumps(config))
    with open(folder / "results.jsonl", "w") as fh:
        for task, by_label in scores.items():
            for lbl, values in by_label.items():
                if lbl == "full":
                    method, scorer, r = "full", None, 0.0
                elif lbl.startswith("kvpress:"):
                    method, scorer, r = lbl, None, ratio
                else:
                    method, scorer = lbl.split("/")
                    r = ratio
                for i, v in enumerate(values):
                    fh.write(json.dumps({"task": task, "sample_id": f"{task}/s{i}", "setting": setting,
                                         "method": method, "scorer": scorer, "ratio": r, "status": "ok",
                                         "score": float(v), "output": f"out{v}", "kv_share": 1 - r,
                                         "new_tokens": 3, "seconds": 0.01}) + "\n")
    return folder


def run(argv: list[str]) -> int:
    return ht.main([str(a) for a in argv])


def test_exact_retention_paired_differences_and_floor(tmp_path, capsys):
    folder = write_run(tmp_path / "runA", SCORES)
    out = tmp_path / "out" / "aware"
    assert run([folder, "--setting", "aware", "--baselines", "uniform,pyramid", "--out", out, *N_BOOT]) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    assert res["excluded_tasks"] == ["gamma"]
    assert [t["task"] for t in res["tasks"]] == ["alpha", "beta", "gamma"]  # the runs' order
    cells = {(c["task"], c["label"]): c for c in res["cells"]}
    assert cells[("alpha", "uniform/snapkv")]["retention"] == pytest.approx(0.5 / 0.75)
    assert cells[("beta", "optimal/snapkv")]["retention"] == pytest.approx(0.75)
    assert cells[("gamma", "uniform/snapkv")]["retention"] is None  # 1 / 0: shown per task, not in the suite
    suite = {e["label"]: e for e in res["suite"]}
    assert suite["uniform/snapkv"]["retention"] == pytest.approx((0.5 / 0.75 + 0.5) / 2)
    assert suite["optimal/snapkv"]["retention"] == pytest.approx((1.0 + 0.75) / 2)
    assert suite["optimal/snapkv"]["n_tasks"] == 2 and suite["optimal/snapkv"]["n_samples"] == 8
    # the CI is the stratified bootstrap of [score; full] per task, resampled within each task
    groups = [np.array([[1, 1, 1, 0], [1, 1, 1, 0]], float), np.array([[1, 0, 1, 1], [1, 1, 1, 1]], float)]
    ci = stratified_bootstrap_ci(groups, ht._ratio_of_means, n_boot=200, seed=0)
    assert suite["optimal/snapkv"]["ci"] == pytest.approx([ci.low, ci.high])

    paired = {(p["label"], p["baseline"]): p for p in res["paired"]}
    assert set(paired) == {("optimal/snapkv", "uniform/snapkv"), ("optimal/snapkv", "pyramid/snapkv"),
                           ("pyramid/snapkv", "uniform/snapkv")}  # later baselines against earlier ones
    p = paired[("optimal/snapkv", "uniform/snapkv")]
    assert p["diff"] == pytest.approx(0.25) and p["n_pairs"] == 8  # (1/4 + 1/4) / 2 over alpha, beta
    per_task = {t["task"]: t for t in p["tasks"]}
    assert per_task["gamma"]["diff"] == pytest.approx(-1.0) and not per_task["gamma"]["included"]
    assert per_task["gamma"]["verdict"] == "against" and per_task["alpha"]["verdict"] == "inconclusive"
    q = paired[("optimal/snapkv", "pyramid/snapkv")]
    assert q["diff"] == pytest.approx((0.5 + 0.75) / 2) and q["verdict"] == "for"
    d = stratified_bootstrap_ci([np.array([1, 1, 0, 0.0]), np.array([1, 0, 1, 1.0])], ht._mean_of_means,
                                n_boot=200, seed=0)
    assert q["ci"] == pytest.approx([d.low, d.high])

    md = out.with_suffix(".md").read_text()
    assert "Excluded from the suite means (full cache below --min-full 0.1): gamma." in md
    assert "| gamma | 4 | 0.00 | no: full-cache mean 0.000 < 0.1 |" in md
    assert "python benchmarks/headline_table.py" in md and "2026-01-02T03:04:05+00:00" in md
    for png in (out.with_name("aware.png"), out.with_name("aware_tasks.png")):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert res["meta"]["model"] == "tiny" and res["meta"]["command"].endswith("--n-boot 200")

    # a floor of 0 keeps gamma in, and its 1 / 0 retention leaves the suite mean undefined
    assert run([folder, "--setting", "aware", "--min-full", "0", "--out", tmp_path / "o2", *N_BOOT]) == 0
    res = json.loads((tmp_path / "o2.json").read_text())
    assert res["excluded_tasks"] == []
    assert {e["label"]: e for e in res["suite"]}["uniform/snapkv"]["retention"] is None


def test_tasks_filter_keeps_only_those_tasks(tmp_path):
    folder = write_run(tmp_path / "runA", SCORES)
    everything, only = tmp_path / "all" / "aware", tmp_path / "only" / "aware"
    assert run([folder, "--setting", "aware", "--out", everything, *N_BOOT]) == 0
    assert run([folder, "--setting", "aware", "--tasks", "alpha", "--out", only, *N_BOOT]) == 0
    res_all = json.loads(everything.with_suffix(".json").read_text())
    res = json.loads(only.with_suffix(".json").read_text())
    assert {c["task"] for c in res["cells"]} == {"alpha"}
    pick = {c["label"]: c["retention"] for c in res["cells"]}
    assert pick == {c["label"]: c["retention"] for c in res_all["cells"] if c["task"] == "alpha"}
    assert pick["uniform/snapkv"] == pytest.approx(2 / 3)
    assert "--tasks alpha" in only.with_suffix(".md").read_text()


def test_repeated_rows_without_output_text_are_not_counted_as_differing(tmp_path):
    """Rows rebuilt from a CSV carry no output text and rounded scores: their repeats are "not compared" and
    "the same score", not "different"."""
    a = write_run(tmp_path / "aw", {"alpha": {"full": [1, 1, 0, 0], "uniform/snapkv": [1, 0, 0, 0]}})
    rows = [json.loads(line) for line in (a / "results.jsonl").read_text().splitlines()]
    for r in rows:  # off by less than a rows CSV's 6 significant digits can show: the same score
        r["score"] += 4e-7
    (a / "results.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "output"}) + "\n"
                                             for r in rows))
    b = write_run(tmp_path / "awj", {"alpha": {"full": [1, 1, 0, 0], "optimal-joint/snapkv": [1, 1, 0, 0]}})
    out = tmp_path / "res" / "merged"
    assert run([a, b, "--setting", "aware", "--out", out, *N_BOOT]) == 0
    (dup,) = json.loads(out.with_suffix(".json").read_text())["duplicates"]
    assert (dup["rows"], dup["score_differs"], dup["output_differs"], dup["output_missing"]) == (4, 0, 0, 4)
    assert "output text differs in 0, not compared in 4" in out.with_suffix(".md").read_text()


def test_merged_folders_with_repeated_full_rows(tmp_path):
    a = write_run(tmp_path / "aw", {"alpha": {"full": [1, 1, 0, 0], "uniform/snapkv": [1, 0, 0, 0]}})
    b = write_run(tmp_path / "awj", {"alpha": {"full": [1, 1, 1, 0], "optimal-joint/snapkv": [1, 1, 0, 0]}})
    out = tmp_path / "res" / "merged"
    csv_path = tmp_path / "res" / "rows.csv"
    assert run([a, b, "--setting", "aware", "--out", out, "--rows-csv", csv_path, *N_BOOT]) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    (dup,) = res["duplicates"]
    assert (dup["run"], dup["first_run"], dup["label"], dup["rows"], dup["score_differs"]) == ("awj", "aw", "full",
                                                                                             4, 1)
    assert dup["score_differences"] == [{"task": "alpha", "sample_id": "alpha/s2", "ratio": 0.0, "first": 0.0,
                                         "this": 1.0}]
    assert dup["output_differs"] == 1 and dup["output_differs_by_task"] == {"alpha": 1} and dup["output_missing"] == 0
    cells = {c["label"]: c for c in res["cells"]}
    assert cells["optimal-joint/snapkv"]["retention"] == pytest.approx(0.5 / 0.5)  # the first folder's full
    assert cells["optimal-joint/snapkv"]["full_mean"] == pytest.approx(0.5)
    p = res["paired"][0]
    assert (p["label"], p["baseline"], p["n_pairs"], p["diff"]) == ("optimal-joint/snapkv", "uniform/snapkv", 4,
                                                                    pytest.approx(0.25))
    md = out.with_suffix(".md").read_text()
    assert "awj repeats 4 `full` rows of aw: 3 with the same score, 1 different" in md
    lines = csv_path.read_text().splitlines()
    assert lines[0].startswith("# made by: python benchmarks/headline_table.py")
    assert lines[1].startswith("# model: tiny (float32), setting aware, 64 context tokens")
    rows = list(csv.DictReader(lines[2:]))
    assert len(rows) == 12 and list(rows[0]) == [*ht.CSV_FIELDS]  # 4 full (once) + 4 uniform + 4 joint
    assert sum(r["method"] == "full" for r in rows) == 4 and {r["run"] for r in rows} == {"aw", "awj"}

    # --strict-duplicates: a differing repeated score is an error, and nothing is written
    out2 = tmp_path / "strict" / "merged"
    assert run([a, b, "--setting", "aware", "--strict-duplicates", "--out", out2, *N_BOOT]) == 2
    assert not out2.parent.exists()


def test_kvpress_rows_join_on_common_samples(tmp_path, monkeypatch):
    dk = write_run(tmp_path / "ag", {
        "alpha": {"full": [1, 1, 1, 1, 0, 0], "uniform/kvzip": [0, 0, 1, 1, 0, 0],
                  "optimal/kvzip": [1, 1, 1, 0, 0, 0]},
    }, setting="agnostic")
    kp = write_run(tmp_path / "kp", {"alpha": {"full": [1, 1, 0], "kvpress:kvzip": [1, 0, 0]}},
                   kind="kvpress-agnostic", setting="agnostic")
    monkeypatch.setattr(ht, "GZIP_ABOVE", 10)  # any CSV is "large": written gzipped, a stale plain one removed
    stale = tmp_path / "r" / "rows.csv"
    stale.parent.mkdir()
    stale.write_text("old")
    out = tmp_path / "r" / "ag"
    assert run([dk, kp, "--setting", "agnostic", "--baselines", "uniform,kvpress:kvzip", "--out", out,
                "--rows-csv", stale, *N_BOOT]) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    cells = {c["label"]: c for c in res["cells"]}
    # kvpress is divided by its own harness's full cache on its own 3 samples
    assert cells["kvpress:kvzip"]["n"] == 3 and cells["kvpress:kvzip"]["retention"] == pytest.approx(
        (1 / 3) / (2 / 3))
    assert cells["optimal/kvzip"]["n"] == 6 and cells["optimal/kvzip"]["retention"] == pytest.approx(0.75)
    common = {e["label"]: e for e in res["common_samples"]["suite"]}
    assert res["common_samples"]["n_per_task"] == {"alpha": 3}
    assert common["optimal/kvzip"]["retention"] == pytest.approx(1.0)  # s0..s2: 3 of 3 vs full 3 of 3
    paired = {(p["label"], p["baseline"]): p for p in res["paired"]}
    assert paired[("kvpress:kvzip", "uniform/kvzip")]["n_pairs"] == 3
    assert paired[("optimal/kvzip", "kvpress:kvzip")]["diff"] == pytest.approx(2 / 3)  # [1,1,1] - [1,0,0]
    (agree,) = res["harness_agreement"]
    assert (agree["n"], agree["score_differs"]) == (3, 1)
    assert not stale.exists()
    text = gzip.decompress((tmp_path / "r" / "rows.csv.gz").read_bytes()).decode()
    assert text.startswith("# made by:") and "kvpress:kvzip" in text and "date not recorded" in text


def test_kvpress_baselines_pair_with_every_scorer_and_adakv_sits_with_its_scores(tmp_path):
    dk = write_run(tmp_path / "ag", {
        "alpha": {"full": [1, 1, 1, 1], "uniform/kvzip": [0, 0, 1, 1], "optimal/snapkv": [1, 1, 0, 0],
                  "optimal/expected_attention": [1, 0, 0, 0]},
    }, setting="agnostic")
    kp = write_run(tmp_path / "kp", {"alpha": {"full": [1, 1, 1, 1], "kvpress:kvzip": [1, 0, 1, 0],
                                               "kvpress:adakv_ea": [0, 0, 0, 1]}},
                   kind="kvpress-agnostic", setting="agnostic")
    out = tmp_path / "ag_out"
    assert run([dk, kp, "--setting", "agnostic", "--baselines", "uniform,kvpress:kvzip,kvpress:adakv_ea",
                "--out", out, *N_BOOT]) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    paired = {(p["label"], p["baseline"]): p["diff"] for p in res["paired"]}
    # a depthkv baseline stays within its scorer: uniform/kvzip is no baseline of the snapkv method
    assert ("optimal/snapkv", "uniform/snapkv") not in paired and ("optimal/snapkv", "uniform/kvzip") not in paired
    # kvpress presses are another tool at the same ratio: every method meets them, whatever its scorer
    assert paired[("optimal/snapkv", "kvpress:kvzip")] == pytest.approx(0.0)  # [1,1,0,0] - [1,0,1,0]
    assert paired[("optimal/expected_attention", "kvpress:adakv_ea")] == pytest.approx(0.0)
    assert paired[("kvpress:adakv_ea", "kvpress:kvzip")] == pytest.approx(-0.25)  # a later baseline vs an earlier
    assert ht.scorer_of("kvpress:adakv_ea") == "expected_attention"  # AdaKV ranks Expected Attention's scores
    assert "### scorer adakv_ea" not in out.with_suffix(".md").read_text()


@pytest.mark.parametrize("case, message", [
    ("baseline", "unknown baseline 'pyramid'; methods in the data: optimal, uniform"),
    ("setting", "no scored rows with setting 'agnostic'; settings found: aware (12 rows)"),
    ("folder", "not a folder or a rows CSV"),
    ("models", "the folders hold different models (other, tiny)"),
    ("prefix", "--out is a prefix without extension"),
    ("row", "row 13 of run a lacks sample_id, score"),
    ("twice", "a run named 'a' is given twice"),
    ("csv_header", "no '# model: ...; runs: ...' line (expected a CSV written by --rows-csv)"),
    ("csv_run", "rows of runs its provenance line does not list: ghost"),
    ("tasks", "--tasks: no scored rows of zeta in setting 'aware'"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, case, message):
    folder = write_run(tmp_path / "a", {"alpha": {"full": [1, 1, 0, 0], "uniform/snapkv": [1, 0, 0, 0],
                                                  "optimal/snapkv": [1, 1, 0, 0]}})
    args = [folder, "--setting", "aware", "--out", tmp_path / "o" / "x", *N_BOOT]
    if case == "baseline":
        args += ["--baselines", "uniform,pyramid"]
    elif case == "setting":
        args[2] = "agnostic"
    elif case == "folder":
        args[0] = tmp_path / "missing"
    elif case == "models":
        args.insert(1, write_run(tmp_path / "b", {"alpha": {"full": [1]}}, model="other"))
    elif case == "prefix":
        args[4] = tmp_path / "o" / "x.md"
    elif case == "row":
        with open(folder / "results.jsonl", "a") as fh:
            fh.write(json.dumps({"task": "alpha", "setting": "aware", "method": "full", "scorer": None,
                                 "ratio": 0.0, "status": "ok"}) + "\n")
    elif case == "twice":
        args.insert(1, folder)
    elif case == "tasks":
        args += ["--tasks", "alpha,zeta"]
    elif case in ("csv_header", "csv_run"):
        rows = tmp_path / "rows.csv"
        assert run([folder, "--setting", "aware", "--out", tmp_path / "t" / "x", "--rows-csv", rows, *N_BOOT]) == 0
        lines = rows.read_text().splitlines()
        if case == "csv_header":
            lines = [line for line in lines if not line.startswith("# model:")]
        else:
            lines.append(lines[-1].rsplit(",", 1)[0] + ",ghost")
        rows.write_text("\n".join(lines) + "\n")
        args[0] = rows
    if case == "prefix":  # argparse's own usage error
        with pytest.raises(SystemExit) as exc:
            run(args)
        assert exc.value.code == 2
    else:
        assert run(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and (case == "prefix" or len(err) == 1)
    assert not (tmp_path / "o").exists()


def test_tag_tells_apart_the_same_method_run_under_other_conditions(tmp_path, capsys):
    """--tag RUN=TAG: the run's methods become METHOD@TAG (paired like any method), its full rows stay `full`."""
    a = write_run(tmp_path / "ag", {"alpha": {"full": [1, 1, 1, 0], "adaptive+heads/kvzip": [1, 0, 0, 0],
                                              "uniform/kvzip": [0, 0, 0, 0]}})
    b = write_run(tmp_path / "agf", {"alpha": {"full": [1, 1, 1, 0], "adaptive+heads/kvzip": [1, 1, 1, 0]}})
    out = tmp_path / "res" / "tagged"
    assert run([a, b, "--setting", "aware", "--tag", "agf=floors", "--out", out, *N_BOOT]) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    cells = {c["label"]: c for c in res["cells"]}
    assert cells["adaptive+heads/kvzip"]["retention"] == pytest.approx(1 / 3)
    assert cells["adaptive+heads@floors/kvzip"]["retention"] == pytest.approx(1.0)
    assert [d["label"] for d in res["duplicates"]] == ["full"]  # only the full rows repeat
    diffs = {p["label"]: p["diff"] for p in res["paired"] if p["baseline"] == "uniform/kvzip"}
    assert diffs["adaptive+heads@floors/kvzip"] == pytest.approx(0.75)

    # untagged, the two runs' adaptive+heads rows collide: the second is a repeated row, not a method
    out2 = tmp_path / "res" / "untagged"
    assert run([a, b, "--setting", "aware", "--out", out2, *N_BOOT]) == 0
    labels = {c["label"] for c in json.loads(out2.with_suffix(".json").read_text())["cells"]}
    assert "adaptive+heads@floors/kvzip" not in labels

    # a tag for a folder not given, or a malformed one: one error line, nothing written
    capsys.readouterr()
    out3 = tmp_path / "bad" / "x"
    assert run([a, b, "--setting", "aware", "--tag", "nope=floors", "--out", out3, *N_BOOT]) == 2
    assert capsys.readouterr().err.strip() == "error: --tag names nope, which is not among the runs' names"
    with pytest.raises(SystemExit) as exc:
        run([a, b, "--setting", "aware", "--tag", "agf=a/b", "--out", out3, *N_BOOT])
    assert exc.value.code == 2
    assert not out3.parent.exists()


def test_a_baseline_with_its_scorer_pairs_with_every_scorer(tmp_path, capsys):
    """--baselines METHOD/SCORER: one label (a scorer variant against the method it varies), like a kvpress press."""
    a = write_run(tmp_path / "ag", {"alpha": {"full": [1, 1, 1, 1], "adaptive+heads/kvzip": [1, 0, 0, 0],
                                              "adaptive+heads/kvzip_v": [1, 1, 0, 1],
                                              "uniform/kvzip_v": [0, 0, 0, 1]}}, setting="agnostic")
    out = tmp_path / "res" / "x"
    assert run([a, "--setting", "agnostic", "--baselines", "uniform,adaptive+heads/kvzip", "--out", out,
                *N_BOOT]) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    paired = {(p["label"], p["baseline"]): p["diff"] for p in res["paired"]}
    assert paired[("adaptive+heads/kvzip_v", "adaptive+heads/kvzip")] == pytest.approx(0.5)
    assert paired[("adaptive+heads/kvzip_v", "uniform/kvzip_v")] == pytest.approx(0.5)
    assert ("uniform/kvzip_v", "adaptive+heads/kvzip") not in paired  # an earlier baseline: not against a later one
    assert ("adaptive+heads/kvzip", "adaptive+heads/kvzip") not in paired
    assert "| kvzip_v | 0.8 | adaptive+heads | adaptive+heads/kvzip |" in out.with_suffix(".md").read_text()
    # a label that is not in the data: one error line, nothing written
    capsys.readouterr()
    out2 = tmp_path / "bad" / "x"
    assert run([a, "--setting", "agnostic", "--baselines", "optimal/kvzip", "--out", out2, *N_BOOT]) == 2
    assert capsys.readouterr().err.strip().startswith("error: unknown baseline 'optimal/kvzip'; methods in the data")
    assert not out2.parent.exists()


def test_a_rows_csv_stands_for_its_runs(tmp_path):
    """The rows a table committed (``--rows-csv``) tabulate again, alone or with a new run on the same samples,
    to the same numbers as the folders they came from: runs, harnesses and tags kept."""
    dk = write_run(tmp_path / "ag", {
        "alpha": {"full": [1, 1, 1, 1, 0, 0], "uniform/kvzip": [0, 0, 1, 1, 0, 0],
                  "optimal/kvzip": [1, 1, 1, 0, 0, 0]},
        "beta": {"full": [1, 1, 0, 1, 1, 1], "uniform/kvzip": [1, 0, 0, 1, 0, 1],
                 "optimal/kvzip": [1, 1, 0, 0, 1, 1]},
    }, setting="agnostic")
    kp = write_run(tmp_path / "kp", {"alpha": {"full": [1, 1, 0], "kvpress:kvzip": [1, 0, 0]},
                                     "beta": {"full": [1, 1, 1], "kvpress:kvzip": [0, 1, 1]}},
                   kind="kvpress-agnostic", setting="agnostic")
    new = write_run(tmp_path / "new", {"alpha": {"full": [1, 1, 1, 1, 0, 0], "optimal/kvzip": [1, 1, 1, 1, 0, 0]},
                                       "beta": {"full": [1, 1, 0, 1, 1, 1], "optimal/kvzip": [1, 0, 0, 1, 1, 1]}},
                    setting="agnostic", created="2026-02-03T00:00:00+00:00")
    common = ["--setting", "agnostic", "--baselines", "uniform,kvpress:kvzip", "--tag", "new=later", *N_BOOT]
    rows = tmp_path / "t" / "rows.csv"
    assert run([dk, kp, "--setting", "agnostic", "--baselines", "uniform", "--out", tmp_path / "t" / "old",
                "--rows-csv", rows, *N_BOOT]) == 0
    assert run([dk, kp, new, *common, "--out", tmp_path / "a" / "x"]) == 0
    assert run([rows, new, *common, "--out", tmp_path / "b" / "x"]) == 0
    a, b = (json.loads((tmp_path / d / "x.json").read_text()) for d in ("a", "b"))
    for key in ("suite", "paired", "cells", "common_samples", "harness_agreement"):
        assert a[key] == b[key], key
    runs = {r["folder"]: r for r in b["meta"]["runs"]}
    assert list(runs) == ["ag", "kp", "new"]
    assert (runs["kp"]["kind"], runs["kp"]["created"]) == ("kvpress-agnostic", None)
    assert runs["ag"]["created"] == "2026-01-02T03:04:05+00:00" and runs["ag"]["command"] == "rows of rows.csv"
    assert b["meta"]["context_tokens"] == 64
    labels = {e["label"] for e in b["suite"]}
    assert {"optimal@later/kvzip", "optimal/kvzip", "kvpress:kvzip"} <= labels
    # the same rows twice (the CSV and the folder it came from) are one run given twice
    assert run([rows, dk, *common[:2], "--out", tmp_path / "c" / "x"]) == 2
