"""CLI: bad input gives a clear error, a non-zero exit and writes nothing."""

from __future__ import annotations

import json

import pytest

from depthkv.cli import main


@pytest.fixture
def prompt(tmp_path):
    p = tmp_path / "prompt.txt"
    p.write_text("The cat sat on the mat. " * 20 + "Where did the cat sit?")
    return p


@pytest.mark.parametrize("ratio", ["1.0", "-0.2", "abc"])
def test_ratio_out_of_range_is_rejected(tmp_path, prompt, ratio, capsys):
    out = tmp_path / "o.json"
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--ratio", ratio, "--prompt-file", str(prompt), "--json", str(out)])
    assert exc.value.code == 2 and not out.exists()
    assert "ratio" in capsys.readouterr().err


def test_unknown_scorer_is_rejected(tmp_path, prompt, capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--scorer", "nope", "--prompt-file", str(prompt)])
    assert "invalid choice" in capsys.readouterr().err


def test_budget_vector_of_wrong_length(tmp_path, prompt, capsys):
    b = tmp_path / "b.json"
    b.write_text(json.dumps({"tokens": [50, 50], "context_len": 100}))
    out = tmp_path / "o.json"
    rc = main(["generate", "--budgets", str(b), "--prompt-file", str(prompt), "--json", str(out)])
    assert rc == 2 and not out.exists()
    assert "2 entries but the model has 30 layers" in capsys.readouterr().err


def test_budget_below_protected_window(tmp_path, prompt, capsys):
    out = tmp_path / "o.json"
    rc = main(["generate", "--ratio", "0.99", "--prompt-file", str(prompt), "--json", str(out)])
    assert rc == 2 and not out.exists()
    assert "at least 20" in capsys.readouterr().err


def test_context_shorter_than_protected_window(tmp_path, capsys):
    p = tmp_path / "short.txt"
    p.write_text("Hi")
    out = tmp_path / "o.json"
    rc = main(["generate", "--ratio", "0.5", "--n-recent", "200", "--prompt-file", str(p), "--json", str(out)])
    assert rc == 2 and not out.exists()
    assert "shorter than the protected window" in capsys.readouterr().err


def test_empty_prompt_and_missing_profile(tmp_path, capsys):
    p = tmp_path / "empty.txt"
    p.write_text("  \n")
    with pytest.raises(SystemExit, match="empty"):
        main(["generate", "--prompt-file", str(p)])
    rc = main(["generate", "--profile", str(tmp_path / "none.json"), "--prompt-file", str(p)])
    assert rc == 2 and "none.json" in capsys.readouterr().err


def test_allocate_needs_profile_for_optimal(capsys):
    rc = main(["allocate", "--layers", "30", "--ratio", "0.6", "--strategy", "optimal"])
    assert rc == 2 and "needs a sensitivity" in capsys.readouterr().err
    assert main(["allocate", "--layers", "30", "--ratio", "0.6", "--strategy", "pyramid"]) == 0
