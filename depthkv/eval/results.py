"""Results files of an evaluation run: ``DIR/config.json`` and the append-only ``DIR/results.jsonl``.

One JSON object per line, one line per cell (sample, setting, method, scorer, ratio). Every row carries the
full configuration, so a row means the same thing wherever it is copied. Rows are appended and flushed one
at a time: a run killed at any moment leaves at most one truncated last line, which :func:`load_rows`
drops (and :class:`ResultsWriter` cuts off before appending), so a restart resumes from the last complete
cell.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from depthkv.io import atomic_write

RESULTS = "results.jsonl"
CONFIG = "config.json"
ROW_SCHEMA = 1


class EvalError(ValueError):
    """A misconfigured evaluation (bad arguments, a results folder from another run, ...)."""


def ratio_key(ratio: float) -> str:
    """Canonical text of a ratio for keys (0.6 and 0.6000000001 are the same cell)."""
    return f"{float(ratio):.6g}"


def cell_key(task: str, sample_id: str, setting: str, method: str, scorer: str | None, ratio: float) -> str:
    """The resumption key of one cell."""
    return "|".join((task, sample_id, setting, method, scorer or "-", ratio_key(ratio)))


def row_key(row: dict[str, Any]) -> str:
    return cell_key(row["task"], row["sample_id"], row["setting"], row["method"], row.get("scorer"), row["ratio"])


def _good_prefix(path: Path) -> tuple[list[dict], int, int]:
    """(rows, byte length of the complete, valid lines, total byte length)."""
    data = path.read_bytes()
    rows: list[dict] = []
    good = 0
    pos = 0
    lineno = 0
    while pos < len(data):
        end = data.find(b"\n", pos)
        lineno += 1
        if end < 0:  # an unterminated last line: a write that was cut off
            break
        line = data[pos:end]
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                if data[end + 1 :].strip():  # a broken line in the middle is not an interruption
                    raise EvalError(f"{path}:{lineno}: corrupt results line ({exc}); fix or remove it") from None
                break
            if not isinstance(row, dict):
                raise EvalError(f"{path}:{lineno}: expected a JSON object per line")
            rows.append(row)
        pos = good = end + 1
    return rows, good, len(data)


def load_rows(path: str | os.PathLike) -> list[dict]:
    """Rows of a results file; a truncated last line (an interrupted write) is ignored."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS
    if not path.exists():
        return []
    return _good_prefix(path)[0]


class ResultsWriter:
    """Appends rows to ``results.jsonl``, one flushed (and fsynced) line per cell."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.rows: list[dict] = []
        if self.path.exists():
            self.rows, good, size = _good_prefix(self.path)
            if good < size:  # drop the cut-off tail so the next row starts on its own line
                with open(self.path, "r+b") as fh:
                    fh.truncate(good)
        self.done = {row_key(r) for r in self.rows}
        self._fh = None

    def __enter__(self) -> ResultsWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")
        return self

    def __exit__(self, *exc) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def append(self, row: dict) -> None:
        key = row_key(row)
        if key in self.done:
            raise EvalError(f"cell {key} is already in {self.path}")
        self._fh.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.rows.append(row)
        self.done.add(key)


def shard_path(folder: str | os.PathLike, rank: int) -> Path:
    """The results file of rank ``rank`` of a data-parallel run (see :mod:`depthkv.eval.parallel`)."""
    return Path(folder) / f"results.rank{int(rank)}.jsonl"


def shard_files(folder: str | os.PathLike) -> list[Path]:
    """The shard files of ``folder``, by rank."""
    found = [(p.name[len("results.rank"):-len(".jsonl")], p) for p in Path(folder).glob("results.rank*.jsonl")]
    return [p for rank, p in sorted((int(r), p) for r, p in found if r.isdigit())]


def read_config(folder: str | os.PathLike) -> dict | None:
    path = Path(folder) / CONFIG
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise EvalError(f"{path} is not valid JSON ({exc}); remove it or use --force") from None


def diff_configs(old: dict, new: dict) -> list[str]:
    """Human-readable differences between two run configurations."""
    out = []
    for k in sorted(set(old) | set(new)):
        if old.get(k) != new.get(k):
            out.append(f"  {k}: {old.get(k, '<absent>')!r} (in the folder) vs {new.get(k, '<absent>')!r} (now)")
    return out


def prepare_folder(folder: str | os.PathLike, run: dict, *, force: bool = False) -> Path:
    """Create ``folder`` for a run described by ``run`` (the comparable arguments), or check it matches.

    A folder holding results of a run with other arguments is an error unless ``force``; with ``force`` the
    old ``config.json`` and ``results.jsonl`` are moved into ``folder/replaced-<time>/`` and the run starts
    afresh.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    old = read_config(folder)
    has_rows = any(p.exists() and p.stat().st_size > 0 for p in (folder / RESULTS, *shard_files(folder)))
    if (old is not None and old.get("run") != run) or (old is None and has_rows):
        if not force:
            if old is None:
                raise EvalError(f"{folder} holds {RESULTS} but no {CONFIG}; use another --out or --force to start over")
            lines = diff_configs(old.get("run", {}), run)
            raise EvalError(
                f"{folder} holds results of a run with other arguments:\n" + "\n".join(lines)
                + "\nrerun with the original arguments to resume, choose another --out, or pass --force to move "
                "the old results aside and start over"
            )
        backup = folder / time.strftime("replaced-%Y%m%d-%H%M%S")
        backup.mkdir()
        for name in (CONFIG, RESULTS, "summary.csv", "summary.json", *(p.name for p in shard_files(folder))):
            if (folder / name).exists():
                os.replace(folder / name, backup / name)
    return folder


BACKUP_PREFIX = "replaced-"


@contextlib.contextmanager
def cleanup_on_error(folder: str | os.PathLike) -> Iterator[Path]:
    """Undo what a run did to ``folder`` if it fails before writing a single result row.

    An evaluation that stops on bad input (a task whose context is too short, a profile made for another
    model, an interrupt during the first prefill, ...) leaves nothing behind: the files and folders it
    created are removed (parents too) and results that ``--force`` moved aside are moved back. Once a row is
    in ``results.jsonl`` the folder is a resumable run and is kept as it is.
    """
    folder = Path(folder)
    created = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    before = set(folder.iterdir()) if folder.is_dir() else set()
    try:
        yield folder
    except BaseException:
        if not any(load_rows(p) for p in (folder / RESULTS, *shard_files(folder))):  # shards: a parallel run
            _undo(folder, before, created)
        raise


def _undo(folder: Path, before: set[Path], created: list[Path]) -> None:
    """Remove the entries of ``folder`` not in ``before``, restoring moved-aside results, then ``created``."""
    new = (set(folder.iterdir()) if folder.is_dir() else set()) - before
    for backup in (p for p in new if p.is_dir() and p.name.startswith(BACKUP_PREFIX)):
        for item in backup.iterdir():
            target = folder / item.name
            if target.is_file():
                target.unlink()
            if not target.exists():
                os.replace(item, target)
        with contextlib.suppress(OSError):
            backup.rmdir()
    for path in new:
        if not path.exists() or path.name.startswith(BACKUP_PREFIX):
            continue  # a restored file, or a backup that could not be emptied (kept: it holds results)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    for d in created:
        with contextlib.suppress(OSError):
            d.rmdir()  # only if empty: never removes anything the run did not create


def iter_rows(folders: Iterable[str | os.PathLike]) -> Iterator[tuple[Path, dict]]:
    for f in folders:
        for r in load_rows(f):
            yield Path(f), r


ROW_CSV_FIELDS = ("method", "task", "setting", "scorer", "ratio", "sample_id", "score", "output")


def write_rows_csv(rows: Iterable[dict], path: str | os.PathLike, max_output_chars: int = 120) -> Path:
    """Every scored row as a small CSV (no budgets or contexts): what a results folder commits beside its plots."""
    path = Path(path)
    ordered = sorted(rows, key=lambda r: (r["method"], r["task"], r["setting"], str(r.get("scorer")),
                                          float(r["ratio"]), r["sample_id"]))
    with atomic_write(path, newline="") as fh:
        w = csv.writer(fh)
        w.writerow(ROW_CSV_FIELDS)
        for r in ordered:
            w.writerow((r["method"], r["task"], r["setting"], r.get("scorer") or "-", f"{float(r['ratio']):g}",
                        r["sample_id"], r.get("score"), (r.get("output") or "")[:max_output_chars]))
    return path
