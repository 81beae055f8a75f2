"""Next-line code completion over the standard library's own Python files (LCC / RepoBench style).

The context is the source preceding a chosen line, cut from the front at a line boundary to the length
target.  When the file prefix is shorter than the target, whole other files of the same split are put in
front, each under a ``# file: <path>`` header (a repository-level context).  The answer is the chosen line,
stripped; it is the next non-empty line after the context.
"""

from __future__ import annotations

import random

from depthkv.tasks._common import CountFn, make_sample, sample_rng
from depthkv.tasks.corpus import python_sources
from depthkv.tasks.registry import TaskSpec, register_task
from depthkv.tasks.sample import Sample

QUESTION = "Complete the next line of code. Answer with that single line of code only."
HEADER = "# file: {path}\n"


def _candidate_lines(lines: list[str], min_chars: int) -> list[int]:
    """Line indices worth predicting: long enough, not comments/docstring quotes, after the first 5 lines."""
    out = []
    for j, line in enumerate(lines):
        s = line.strip()
        if j < 5 or len(s) < min_chars or s.startswith(("#", '"""', "'''")):
            continue
        out.append(j)
    return out


def _front_cut(text: str, n: int, count: CountFn) -> str:
    """Longest suffix of ``text`` starting at a line start with ``count <= n`` (binary search)."""
    if count(text) <= n:
        return text
    starts = [0] + [k + 1 for k, ch in enumerate(text) if ch == "\n" and k + 1 < len(text)]
    lo, hi, best = 0, len(starts) - 1, len(text)
    while lo <= hi:  # smaller start index -> longer suffix
        mid = (lo + hi) // 2
        if count(text[starts[mid] :]) <= n:
            best, hi = starts[mid], mid - 1
        else:
            lo = mid + 1
    return text[best:]


def _make(
    n: int,
    seed: int,
    *,
    context_tokens: int,
    count: CountFn,
    counter_name: str,
    split: str,
    min_chars: int = 12,
) -> list[Sample]:
    files = [(p, t) for p, t in python_sources(split) if t.strip()]
    if not files:
        raise RuntimeError(f"code_next_line: no source files in split {split!r}")
    out = []
    for i in range(n):
        rng = sample_rng("code_next_line", split, seed, i)
        path, cut, target, context, extra = _pick(rng, files, context_tokens, count, min_chars)
        out.append(
            make_sample(
                task="code_next_line",
                split=split,
                seed=seed,
                index=i,
                context=context,
                question=QUESTION,
                answer=target.strip(),
                metric="edit_sim",
                count=count,
                counter_name=counter_name,
                target_tokens=context_tokens,
                meta={"source_file": path, "line": cut + 1, "answer_raw": target, "prepended_files": extra},
            )
        )
    return out


def _pick(rng: random.Random, files, context_tokens: int, count: CountFn, min_chars: int):
    while True:
        path, text = files[rng.randrange(len(files))]
        lines = text.splitlines(keepends=True)
        cands = _candidate_lines(lines, min_chars)
        if cands:
            break
    # prefer a cut whose own-file prefix already fills the target (checked cheaply, by characters first)
    prefix_chars = []
    total = 0
    for line in lines:
        prefix_chars.append(total)
        total += len(line)
    est_chars = context_tokens * len(text) / max(1, count(text))
    long_enough = [j for j in cands if prefix_chars[j] >= 1.05 * est_chars]
    cut = rng.choice(long_enough or cands)
    prefix = "".join(lines[:cut])
    body = prefix if long_enough else HEADER.format(path=path) + prefix
    blocks: list[tuple[str, str]] = []  # (path, text) of files put in front, nearest first
    have = count(body)
    if have < context_tokens:
        others = [f for f in files if f[0] != path]
        rng.shuffle(others)
        for other_path, other_text in others:
            if have >= context_tokens:
                break
            block = HEADER.format(path=other_path) + other_text.rstrip("\n") + "\n\n"
            blocks.append((other_path, block))
            have += count(block)
    full = "".join(b for _, b in reversed(blocks)) + body
    context = _front_cut(full, context_tokens, count)
    # prepended files of which some text survived the front cut, in context order
    offset, end, extra = len(full) - len(context), 0, []
    for other_path, block in reversed(blocks):
        end += len(block)
        if end > offset:
            extra.append(other_path)
    return path, cut, lines[cut].rstrip("\n"), context, extra


register_task(
    TaskSpec(
        name="code_next_line",
        make=_make,
        metric="edit_sim",
        description="next-line completion over standard-library Python files (front-truncated prefix)",
    )
)
