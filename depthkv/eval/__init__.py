"""depthkv.eval: evaluation sweeps (one prefill per sample, resumable JSONL), summaries with CIs, reports.

    from depthkv.eval import EvalConfig, run_eval, summarise, build_report
    run = run_eval(lm, EvalConfig(tasks=("needle",), methods=("full", "uniform", "optimal"),
                                  profile="profile.json"), "runs/needle")
    cells = summarise(run.rows)              # mean + 95 % CI per cell, paired diff vs uniform
    build_report(["runs/needle"], "report.html")
"""

from depthkv.eval.report import build_report, load_runs
from depthkv.eval.results import EvalError, ResultsWriter, cell_key, load_rows, row_key
from depthkv.eval.runner import EvalConfig, EvalRun, run_eval
from depthkv.eval.summary import print_summary, summarise, write_summary

__all__ = [
    "EvalConfig", "EvalError", "EvalRun", "ResultsWriter", "build_report", "cell_key", "load_rows", "load_runs",
    "print_summary", "row_key", "run_eval", "summarise", "write_summary",
]
