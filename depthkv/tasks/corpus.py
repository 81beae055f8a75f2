"""Real text that every CPython installation already carries: the offline corpus for the task generators.

Sources (all read from the standard library directory, ``sysconfig.get_paths()["stdlib"]``):

* **docstrings** of the pure-Python standard library modules (module, class and function docstrings),
  extracted with :mod:`ast` — nothing is imported, so no module side effects — and their **comment
  blocks** (runs of whole-line ``#`` comments);
* the **language reference topics** shipped for ``help()`` (``pydoc_data/topics.py``, parsed with
  :mod:`ast`), i.e. the prose of the Python reference manual;
* the interpreter's **licence** text (``LICENSE.txt``);
* the **Python source files** themselves (for next-line code completion).

Only prose paragraphs are kept for haystacks: doctest examples, indented code blocks, headings and
parameter tables are dropped, and paragraph lines are re-flowed into single lines.

Determinism: file lists are sorted, parsing is pure and all random choices take an explicit seed, so
the same Python *version* (major.minor.micro) gives the same corpus on any machine.  The text does depend
on that version (docstrings change between releases) — :func:`corpus_id` names it and
:func:`corpus_fingerprint` hashes it, for provenance.  Parts of the standard library that Linux
distributions ship as separate packages (``test``, ``idlelib``, ``tkinter``, ``lib2to3``,
``distutils``, ...) and machine-specific files (``_sysconfigdata*``) are excluded, so that different
builds of one version read the same set of files.  A distribution that patches standard-library files
(Debian patches e.g. ``site.py`` and ``sysconfig.py``) can still differ in those files' text: compare
:func:`corpus_fingerprint` when results must be reproduced across machines.  Parsed documents are cached
on disk (see :func:`_cache_path`); the first use parses the library, which takes several seconds.

Calibration and evaluation must not share text: every source (a file or a reference topic) is
assigned to the ``"calib"`` or ``"eval"`` half by a stable hash of its name (:func:`split_of`).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import random
import re
import sys
import sysconfig
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from depthkv.io import cache_root, write_json

__all__ = [
    "Passage",
    "Document",
    "SPLITS",
    "corpus_id",
    "corpus_fingerprint",
    "stdlib_dir",
    "split_of",
    "prose_passages",
    "documents",
    "python_sources",
    "key_words",
    "haystack",
    "truncate_to",
]

SPLITS = ("calib", "eval")

# Top-level standard library entries that are missing or packaged separately on some systems, or that
# are data rather than text.  Excluding them keeps the corpus identical across builds of one version.
_EXCLUDED_TOP = frozenset(
    {
        "test",
        "tests",
        "idlelib",
        "tkinter",
        "turtle.py",
        "turtledemo",
        "lib2to3",
        "distutils",
        "ensurepip",
        "site-packages",
        "dist-packages",
        "lib-dynload",
        "__pycache__",
        "__phello__",
        "__hello__.py",
        "this.py",  # rot13-encoded text
        "antigravity.py",
    }
)
_EXCLUDED_PARTS = frozenset({"__pycache__", "test", "tests", "idle_test"})

_MIN_WORDS = 12
_PASSAGE_CHARS = 1500  # haystack passages are groups of consecutive paragraphs up to about this size


@dataclass(frozen=True)
class Passage:
    """A few consecutive prose paragraphs from one source (``doc:``, ``topic:`` or ``license:`` name)."""

    source: str
    text: str


@dataclass(frozen=True)
class Document:
    """A longer coherent text (a module's documentation, a reference topic, the licence)."""

    source: str
    title: str
    paragraphs: tuple[str, ...]

    @property
    def text(self) -> str:
        return "\n\n".join(self.paragraphs)


def stdlib_dir() -> str:
    """The directory of the pure-Python standard library of the running interpreter."""
    return sysconfig.get_paths()["stdlib"]


def corpus_id() -> str:
    """Names the corpus, including the Python version it depends on, e.g. ``python-stdlib-3.11.7``."""
    v = sys.version_info
    return f"python-stdlib-{v.major}.{v.minor}.{v.micro}"


def split_of(source: str) -> str:
    """Stable assignment of a source name to ``"calib"`` or ``"eval"`` (SHA-256, not ``hash()``)."""
    return SPLITS[hashlib.sha256(source.encode("utf-8")).digest()[0] & 1]


def _check_split(split: str | None) -> None:
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")


# --------------------------------------------------------------------------------------------- files


@functools.lru_cache(maxsize=1)
def _stdlib_files() -> tuple[str, ...]:
    """Relative paths (``/``-separated, sorted) of the ``.py`` files in the corpus."""
    root = stdlib_dir()
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        parts = [] if rel_dir == "." else rel_dir.split(os.sep)
        if parts and (parts[0] in _EXCLUDED_TOP or parts[0].startswith("config-")):
            dirnames[:] = []
            continue
        if any(p in _EXCLUDED_PARTS for p in parts):
            dirnames[:] = []
            continue
        dirnames.sort()
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            if not parts and (name in _EXCLUDED_TOP or name.startswith("_sysconfigdata")):
                continue
            out.append("/".join([*parts, name]))
    out.sort()
    return tuple(out)


def _read(rel: str) -> str:
    with open(os.path.join(stdlib_dir(), *rel.split("/")), encoding="utf-8", errors="replace") as fh:
        return fh.read()


# ----------------------------------------------------------------------------------------- prose


_DECORATION = re.compile(r"^\s*([=\-~*^#+_.`'\"])\1{2,}\s*$")
_CODEY = ("&gt;&gt;&gt;", ">>>", "...", ".. ", "$ ", "% ", "|", "+--", "::")


def _prose_paragraphs(text: str) -> list[str]:
    """Split ``text`` on blank lines and keep the paragraphs that read as prose, re-flowed to one line."""
    out: list[str] = []
    for para in re.split(r"\n[ \t]*\n", text.expandtabs(8)):
        lines = [ln.rstrip() for ln in para.strip("\n").split("\n") if ln.strip()]
        if not lines:
            continue
        if lines[0][:1].isspace():
            continue
        if any(len(ln) - len(ln.lstrip()) >= 3 for ln in lines):
            continue  # indented code, grammar rules, tables, parameter lists
        if any(ln.lstrip().startswith(_CODEY) or _DECORATION.match(ln) for ln in lines):
            continue
        flat = " ".join(ln.strip() for ln in lines)
        words = re.findall(r"[A-Za-z]+", flat)
        if len(words) < _MIN_WORDS:
            continue
        visible = [c for c in flat if not c.isspace()]
        if sum(c.isalpha() for c in visible) < 0.75 * len(visible):
            continue
        if not re.search(r"[.!?]", flat):
            continue
        out.append(re.sub(r"\s+", " ", flat))
    return out


def _docstrings(source: str) -> list[tuple[int, str]]:
    """``(line, docstring)`` of the module and every class and function in it."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    out: list[tuple[int, str]] = []
    stack: list[ast.AST] = [tree]
    while stack:  # statements only (definitions cannot hide inside expressions): much cheaper than ast.walk
        node = stack.pop()
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                out.append((node.body[0].lineno, doc))
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            children = getattr(node, field, None)
            if isinstance(children, list):
                stack.extend(children)
    return out


def _comment_blocks(source: str) -> list[tuple[int, str]]:
    """``(line, text)`` of runs of whole-line ``#`` comments; an empty ``#`` line separates paragraphs.

    One space after ``#`` is removed and deeper indentation kept, so code quoted in comments is still
    recognisable as code (and dropped by the prose filter).
    """
    out: list[tuple[int, str]] = []
    buf: list[str] = []
    start = 0
    for lineno, line in enumerate(source.splitlines(), 1):
        stripped = line.lstrip()
        if stripped.startswith("#") and not stripped.startswith("#!"):
            if not buf:
                start = lineno
            body = stripped[1:]
            buf.append(body[1:] if body.startswith(" ") else body)
            continue
        if buf:
            out.append((start, "\n".join(buf)))
            buf = []
    if buf:
        out.append((start, "\n".join(buf)))
    return out


def _module_name(rel: str) -> str:
    mod = rel[:-3].replace("/", ".")
    return mod[: -len(".__init__")] if mod.endswith(".__init__") else mod


_CACHE_FORMAT = 3


def _cache_path() -> str:
    """Location of the on-disk cache of parsed documents (parsing the standard library takes seconds).

    Keyed by the corpus id, this module's parsing format and the names, sizes and modification times of
    the source files, so a changed installation never reads a stale cache.  ``DEPTHKV_CACHE`` overrides
    the base directory (default ``~/.cache/depthkv``).
    """
    base = str(cache_root())
    sig = hashlib.sha256(f"{_CACHE_FORMAT}|{stdlib_dir()}".encode())
    for rel in (*_stdlib_files(), "LICENSE.txt"):
        try:
            st = os.stat(os.path.join(stdlib_dir(), *rel.split("/")))
        except OSError:
            continue
        sig.update(f"{rel}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return os.path.join(base, "corpus", f"{corpus_id()}-{sig.hexdigest()[:16]}.json")


@functools.lru_cache(maxsize=1)
def _all_documents() -> tuple[Document, ...]:
    path = _cache_path()
    try:
        with open(path, encoding="utf-8") as fh:
            rows = json.load(fh)
        return tuple(Document(r["source"], r["title"], tuple(r["paragraphs"])) for r in rows)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    docs = _parse_documents()
    try:
        write_json(path, [{"source": d.source, "title": d.title, "paragraphs": d.paragraphs} for d in docs],
                   indent=None)
    except OSError:
        pass  # read-only home: just parse again next time
    return docs


def _parse_documents() -> tuple[Document, ...]:
    docs: list[Document] = []
    # language reference topics
    topics_rel = "pydoc_data/topics.py"
    if os.path.exists(os.path.join(stdlib_dir(), "pydoc_data", "topics.py")):
        tree = ast.parse(_read(topics_rel))
        for node in tree.body:
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
                topics = ast.literal_eval(node.value)
                for name in sorted(topics):
                    paras = _prose_paragraphs(topics[name])
                    if paras:
                        title = topics[name].strip().split("\n", 1)[0].strip()
                        docs.append(Document(f"topic:{name}", title, tuple(paras)))
    # module documentation: docstrings and comment blocks, in source order
    for rel in _stdlib_files():
        if rel == topics_rel or rel.startswith("encodings/"):
            continue
        source = _read(rel)
        paras: list[str] = []
        for _line, text in sorted(_docstrings(source) + _comment_blocks(source)):
            paras.extend(_prose_paragraphs(text))
        if paras:
            docs.append(Document(f"doc:{rel}", f"Module {_module_name(rel)}", tuple(paras)))
    # licence
    lic = os.path.join(stdlib_dir(), "LICENSE.txt")
    if os.path.exists(lic):
        paras = _prose_paragraphs(_read("LICENSE.txt"))
        if paras:
            docs.append(Document("license:LICENSE.txt", "Python licence", tuple(paras)))
    if not docs:
        raise RuntimeError(f"no prose found in the standard library at {stdlib_dir()!r}")
    # the standard library repeats some docstrings verbatim (e.g. _pyio vs io): keep first occurrences only,
    # so haystacks do not repeat paragraphs and the calib/eval halves share no text
    seen: set[str] = set()
    unique: list[Document] = []
    for d in docs:
        paras = tuple(p for p in d.paragraphs if not (p in seen or seen.add(p)))
        if paras:
            unique.append(Document(d.source, d.title, paras))
    return tuple(unique)


def documents(split: str | None = None) -> tuple[Document, ...]:
    """Coherent documents (reference topics, per-module docstrings, licence), in a fixed order.

    Topics come first (sorted by name), then modules (sorted by path), then the licence.  A paragraph
    that occurs more than once in the standard library is kept only where it occurs first.

    ``split`` ("calib"/"eval") keeps only the documents whose source hashes to that half.
    """
    _check_split(split)
    docs = _all_documents()
    if split is not None:
        docs = tuple(d for d in docs if split_of(d.source) == split)
    return docs


@functools.lru_cache(maxsize=4)
def prose_passages(split: str | None = None) -> tuple[Passage, ...]:
    """Haystack units: runs of consecutive prose paragraphs of one document, up to ~1500 characters."""
    out: list[Passage] = []
    for doc in documents(split):
        buf: list[str] = []
        size = 0
        for para in doc.paragraphs:
            if buf and size + len(para) > _PASSAGE_CHARS:
                out.append(Passage(doc.source, "\n\n".join(buf)))
                buf, size = [], 0
            buf.append(para)
            size += len(para) + 2
        if buf:
            out.append(Passage(doc.source, "\n\n".join(buf)))
    return tuple(out)


def python_sources(split: str | None = None) -> tuple[tuple[str, str], ...]:
    """``(relative path, source text)`` of the standard library's Python files (sorted by path).

    Encoding tables and the reference-topic data file are left out.
    """
    _check_split(split)
    return _python_sources(split)


@functools.lru_cache(maxsize=4)
def _python_sources(split: str | None) -> tuple[tuple[str, str], ...]:
    out = []
    for rel in _stdlib_files():
        if rel.startswith(("encodings/", "pydoc_data/")):
            continue
        if split is not None and split_of(f"src:{rel}") != split:
            continue
        out.append((rel, _read(rel)))
    return tuple(out)


@functools.lru_cache(maxsize=4)
def key_words(split: str | None = None) -> tuple[str, ...]:
    """Distinct lower-case English-looking words (6–10 letters) from the prose, sorted.

    Used as needle keys; the calib and eval halves are disjoint (split by a hash of the word).
    """
    _check_split(split)
    words: set[str] = set()
    for p in prose_passages(None):
        words.update(w for w in re.findall(r"(?<![\w.])[a-z]{6,10}(?![\w.])", p.text))
    if split is not None:
        words = {w for w in words if split_of(f"word:{w}") == split}
    return tuple(sorted(words))


@functools.lru_cache(maxsize=1)
def corpus_fingerprint() -> str:
    """SHA-256 (first 16 hex digits) over every passage and source file in the corpus."""
    h = hashlib.sha256(corpus_id().encode())
    for p in prose_passages(None):
        h.update(p.source.encode())
        h.update(p.text.encode())
    for rel, text in python_sources(None):
        h.update(rel.encode())
        h.update(text.encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------- length


_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s|$)")


def truncate_to(
    text: str, n: int, count: Callable[[str], int], *, from_front: bool = False, at: str = "word"
) -> str:
    """Longest prefix of ``text`` with ``count <= n``, cut at a word (``at="word"``) or sentence end
    (``at="sentence"``); with ``from_front=True`` the longest such suffix, starting at a word.

    Binary search over the boundaries: O(log boundaries) calls of ``count``.  May return ``""``.
    """
    if at not in ("word", "sentence"):
        raise ValueError(f"at must be 'word' or 'sentence', got {at!r}")
    if n <= 0:
        return ""
    if count(text) <= n:
        return text
    if from_front:
        # candidate starts; a later start gives a shorter suffix, so sort descending: pieces grow with i
        cuts = sorted((m.end() for m in re.finditer(r"\s+", text)), reverse=True)

        def piece(i: int) -> str:
            return text[cuts[i] :]
    else:
        if at == "sentence":
            cuts = [m.end() for m in _SENTENCE_END.finditer(text)]
        else:
            cuts = [m.start() for m in re.finditer(r"\s+", text)]

        def piece(i: int) -> str:
            return text[: cuts[i]]

    lo, hi, best = 0, len(cuts) - 1, ""
    while lo <= hi:
        mid = (lo + hi) // 2
        cand = piece(mid)
        if count(cand) <= n:
            best, lo = cand, mid + 1
        else:
            hi = mid - 1
    return best


def haystack(
    n: int,
    seed: int,
    count_tokens: Callable[[str], int] | None = None,
    *,
    split: str | None = None,
    sep: str = "\n\n",
) -> str:
    """Real prose of about ``n`` units: passages from the corpus in a seeded random order.

    ``n`` is measured with ``count_tokens`` (a tokenizer's length function); when it is ``None``, ``n`` is a
    number of characters.  The result is within about 2 % of ``n`` and ends at the end of a sentence
    (passages that do not fit whole are cut after a sentence; only if that cannot get within 2 % is the last
    one cut at a word).  Passages repeat (in a fresh order) only if ``n`` exceeds the split's corpus.
    ``split`` restricts the text to the calibration or evaluation half of the corpus.
    """
    count = count_tokens or len
    passages = prose_passages(split)
    if not passages:
        raise RuntimeError(f"empty corpus for split {split!r}")
    rng = random.Random(_seed_int("haystack", split, seed))
    order: list[int] = []

    def next_text() -> str:
        if not order:
            order.extend(range(len(passages)))
            rng.shuffle(order)
        return passages[order.pop()].text

    pieces: list[str] = []
    total = 0
    sep_cost = count(sep)
    tol = max(2, int(0.02 * n))
    misses = 0
    while True:
        while n - total > tol:
            text = next_text()
            joint = sep_cost if pieces else 0
            cost = count(text) + joint
            if total + cost <= n:
                pieces.append(text)
                total += cost
                continue
            misses += 1
            at = "sentence" if misses <= 8 else "word"
            cut = truncate_to(text, n - total - joint, count, at=at) if n - total - joint > 0 else ""
            if cut:
                pieces.append(cut)
                total += count(cut) + joint
            if at == "word":
                break
        out = sep.join(pieces)
        actual = count(out)
        if actual > n + tol:
            return truncate_to(out, n, count, at="sentence") or truncate_to(out, n, count)
        if actual >= n - tol or misses > 8:
            return out
        total = actual  # token counts of pieces were not additive: top up


def _seed_int(*parts: object) -> int:
    """A 64-bit seed from any parts, stable across processes and Python versions."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big")


def seeded_choice(seq: Sequence, rng: random.Random):
    """``rng.choice`` that raises a clear error on an empty sequence."""
    if not seq:
        raise RuntimeError("nothing to choose from (empty corpus split?)")
    return seq[rng.randrange(len(seq))]
