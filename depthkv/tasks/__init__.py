"""depthkv.tasks: offline task generators over real text, user JSONL data, metrics and prompting.

    from depthkv.tasks import generate, calibration_mix, score, build_prompt
    samples = generate("needle", 20, seed=0, context_tokens=4096, count_tokens=token_counter(tok))
    ctx_ids, q_ids = build_prompt(tok, samples[0], question_in_prefill=False)
    score(samples[0], output_text)

Task families (:data:`TASKS`): ``needle``, ``multikey``, ``vartrack``, ``gsm_inf``, ``code_next_line``,
``summarise``, ``multihop`` (two-hop QA across documents), ``docqa`` (document QA among distractor
documents) and ``jsonl``.  The haystack text comes from the running Python's standard library
(docstrings, reference manual topics, licence, source files), so it depends on the Python version; see
:mod:`depthkv.tasks.corpus`.
"""

from depthkv.tasks import (  # noqa: F401
    code_next_line,
    docqa,
    gsm_inf,
    jsonl,
    multihop,
    multikey,
    needle,
    summarise,
    vartrack,
)
from depthkv.tasks._common import approx_tokens
from depthkv.tasks.corpus import corpus_fingerprint, corpus_id, haystack
from depthkv.tasks.jsonl import TaskDataError, load_jsonl
from depthkv.tasks.metrics import (
    METRICS,
    MetricSpec,
    edit_similarity,
    exact_match,
    f1_score,
    normalise,
    number_match,
    register_metric,
    rouge,
    score,
    set_match,
    substring_match,
    yap_score,
)
from depthkv.tasks.prompt import build_prompt, prompt_text, token_counter
from depthkv.tasks.registry import (
    CALIBRATION_FAMILIES,
    TASKS,
    TaskSpec,
    calibration_mix,
    generate,
    register_task,
)
from depthkv.tasks.sample import Sample, read_samples, write_samples

__all__ = [
    "CALIBRATION_FAMILIES",
    "METRICS",
    "MetricSpec",
    "Sample",
    "TASKS",
    "TaskDataError",
    "TaskSpec",
    "approx_tokens",
    "build_prompt",
    "calibration_mix",
    "corpus_fingerprint",
    "corpus_id",
    "edit_similarity",
    "exact_match",
    "f1_score",
    "generate",
    "haystack",
    "load_jsonl",
    "normalise",
    "number_match",
    "prompt_text",
    "read_samples",
    "register_metric",
    "register_task",
    "rouge",
    "score",
    "set_match",
    "substring_match",
    "token_counter",
    "write_samples",
    "yap_score",
]
