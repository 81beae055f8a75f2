"""Atomic writes (depthkv.io) and the optional eval extra (depthkv.extras): missing packages say which extra."""

from __future__ import annotations

import ast
import csv
import json
import os
import stat
import sys
from pathlib import Path

import pytest

from depthkv.extras import MissingExtraError, pyplot, require
from depthkv.io import atomic_path, atomic_write, write_bytes, write_json

# ------------------------------------------------------------------------------------------- atomic writes


def test_write_json_round_trip_creates_folders_and_shares_the_file(tmp_path):
    path = tmp_path / "a" / "b" / "out.json"
    data = {"name": "café", "values": [1, 2.5, None], "nested": {"x": True}}
    assert write_json(path, data) == path
    text = path.read_text(encoding="utf-8")
    assert json.loads(text) == data and text.endswith("}\n") and "café" in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    write_json(path, {"b": 1, "a": 2}, indent=None, sort_keys=True)
    assert path.read_text() == '{"a": 2, "b": 1}\n'
    assert os.listdir(path.parent) == ["out.json"]  # no temporary file left behind


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "profile.json"
    write_json(path, {"version": 1})
    with pytest.raises(TypeError):
        write_json(path, {"version": 2, "bad": object()})  # not serialisable, half-way through the dump
    assert json.loads(path.read_text()) == {"version": 1}
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(tmp_path / "new.txt") as fh:
            fh.write("partial")
            raise RuntimeError("boom")
    assert sorted(os.listdir(tmp_path)) == ["profile.json"]


def test_atomic_write_csv_newlines(tmp_path):
    path = tmp_path / "t.csv"
    with atomic_write(path, newline="") as fh:
        csv.writer(fh).writerows([["a", "b"], ["1", "x,y"]])
    assert path.read_bytes() == b'a,b\r\n1,"x,y"\r\n'  # the csv module's own line ends, not doubled


def test_every_json_writer_goes_through_depthkv_io():
    """One atomic JSON writer: no module writes JSON with write_text/json.dump on its own file handle."""
    root = Path(__file__).resolve().parent.parent / "depthkv"
    offenders = []
    for path in root.rglob("*.py"):
        if path.name == "io.py" and path.parent == root:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                f = node.func
                if f.attr == "dump" and isinstance(f.value, ast.Name) and f.value.id == "json":
                    offenders.append(f"{path.relative_to(root)}:{node.lineno} json.dump")
                if f.attr == "write_text" and node.args and isinstance(node.args[0], ast.Call) and isinstance(
                        node.args[0].func, ast.Attribute) and node.args[0].func.attr == "dumps":
                    offenders.append(f"{path.relative_to(root)}:{node.lineno} write_text(json.dumps(...))")
    assert not offenders, offenders


def test_bytes_and_named_writers_are_atomic_and_shared(tmp_path):
    path = write_bytes(tmp_path / "a" / "plot.png", b"\x89PNG\x00")
    assert path.read_bytes() == b"\x89PNG\x00" and stat.S_IMODE(path.stat().st_mode) == 0o644
    with atomic_path(tmp_path / "a" / "t.bin") as tmp:  # a writer that takes a file name (safetensors)
        assert tmp.parent == tmp_path / "a" and tmp.name != "t.bin"
        tmp.write_bytes(b"xyz")
    assert (tmp_path / "a" / "t.bin").read_bytes() == b"xyz"
    with pytest.raises(OSError, match="disk full"):
        with atomic_path(tmp_path / "a" / "t.bin") as tmp:
            tmp.write_bytes(b"half")
            raise OSError("disk full")
    assert (tmp_path / "a" / "t.bin").read_bytes() == b"xyz"
    assert sorted(os.listdir(tmp_path / "a")) == ["plot.png", "t.bin"]


def test_every_temporary_file_writer_is_depthkv_io():
    """One atomic writer: no module or benchmark makes its own temporary file to rename over a result."""
    repo = Path(__file__).resolve().parent.parent
    offenders = []
    for path in [*(repo / "depthkv").rglob("*.py"), *(repo / "benchmarks").glob("*.py")]:
        if path == repo / "depthkv" / "io.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("mkstemp", "NamedTemporaryFile"):
                offenders.append(f"{path.relative_to(repo)}:{node.lineno} {node.attr}")
    assert not offenders, offenders


# ------------------------------------------------------------------------------------------- eval extra


def _hide(monkeypatch, *modules: str) -> None:
    """Simulate an install without ``modules``: ``import`` of a name mapped to None raises ImportError."""
    for name in list(sys.modules):
        if any(name == m or name.startswith(m + ".") for m in modules):
            monkeypatch.delitem(sys.modules, name)
    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)


def test_missing_matplotlib_names_the_extra(monkeypatch):
    _hide(monkeypatch, "matplotlib")
    with pytest.raises(MissingExtraError) as err:
        pyplot("the sensitivity plot")
    msg = str(err.value)
    assert msg == ("the sensitivity plot needs the optional package 'matplotlib'; install it with: "
                   "pip install 'depthkv[eval]'")
    assert isinstance(err.value, ImportError)


def test_missing_rouge_names_the_extra_before_any_model_work(monkeypatch):
    from depthkv.eval import EvalConfig
    from depthkv.tasks import metrics

    _hide(monkeypatch, "rouge_score")
    metrics._rouge_scorer.cache_clear()
    try:
        with pytest.raises(MissingExtraError, match=r"'rouge-score'.*pip install 'depthkv\[eval\]'"):
            metrics.rouge("a summary", "the reference")
        with pytest.raises(MissingExtraError, match="ROUGE metric of summarise"):
            EvalConfig(tasks=("summarise",), methods=("full", "uniform")).validate()
        EvalConfig(tasks=("needle",), methods=("full", "uniform")).validate()  # exact-match tasks need no extra
    finally:
        metrics._rouge_scorer.cache_clear()


def test_cli_without_matplotlib_is_one_line_exit_2_and_writes_nothing(monkeypatch, tmp_path, capsys):
    from depthkv.cli import main

    _hide(monkeypatch, "matplotlib")
    out, plot = tmp_path / "b.json", tmp_path / "b.png"
    code = main(["allocate", "--layers", "4", "--ratio", "0.5", "--context-tokens", "256",
                 "--out", str(out), "--plot", str(plot)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err == ("error: --plot needs the optional package 'matplotlib'; install it with: "
                   "pip install 'depthkv[eval]'")
    assert not out.exists() and not plot.exists()


def test_report_without_matplotlib_fails_before_writing(monkeypatch, tmp_path):
    from depthkv.eval import build_report

    _hide(monkeypatch, "matplotlib")
    with pytest.raises(MissingExtraError, match="depthkv report"):
        build_report([tmp_path / "runs"], tmp_path / "out" / "report.html")
    assert not (tmp_path / "out").exists()


def test_require_imports_what_is_there():
    assert require("json", "anything") is json


def test_optional_packages_are_imported_only_through_extras():
    """The core install has no matplotlib / rouge-score: no module imports them directly."""
    root = Path(__file__).resolve().parent.parent / "depthkv"
    direct = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.split(".")[0] in ("matplotlib", "rouge_score") for n in names):
                direct.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not direct, direct
