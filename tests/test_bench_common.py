"""benchmarks/_common.py: the recorded command of a result is one that runs again as typed."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

from _common import command_line


def test_command_line_quotes_arguments_so_the_command_runs_again(monkeypatch):
    argv = ["--variant", "kvzip_vc:diversity=0.5", "--scorer-options", '{"kvzip": {"self_window": 1}}', "--out", "a b"]
    cmd = command_line("/somewhere/benchmarks/scorer_dev.py", argv)
    assert cmd.startswith("python benchmarks/scorer_dev.py --variant kvzip_vc:diversity=0.5 --scorer-options '{")
    assert shlex.split(cmd) == ["python", "benchmarks/scorer_dev.py", *argv]
    monkeypatch.setattr(sys, "argv", ["benchmarks/fast_decode.py", "--contexts", "1024"])
    assert command_line("fast_decode.py") == "python benchmarks/fast_decode.py --contexts 1024"
    assert command_line("tp_decode.py", [], launcher="torchrun --nproc-per-node 2") == (
        "torchrun --nproc-per-node 2 benchmarks/tp_decode.py")


def test_no_benchmark_writes_its_command_from_sys_argv_by_hand():
    """One home for the recorded command: the scripts call command_line, none joins sys.argv itself."""
    bench = Path(__file__).resolve().parent.parent / "benchmarks"
    hand = re.compile(r'"python "\s*\+|join\(sys\.argv|join\(\["python"|benchmarks/\w+\.py" \+')
    offenders = [f"{p.name}:{i}" for p in sorted(bench.glob("*.py")) if p.name != "_common.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1) if hand.search(line)]
    assert not offenders, offenders
