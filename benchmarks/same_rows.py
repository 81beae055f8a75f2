"""Do several ``depthkv eval`` folders hold the same rows? (data-parallel runs against a one-device run)

Compares, cell by cell, what a run decides — output text, score and per-layer budgets — and ignores what may
differ between equal runs (timings, device names, dates). Exit code 0 when every folder has exactly the cells of
the first and equal rows, 1 otherwise (the differing cells are listed).

    python benchmarks/same_rows.py runs/one runs/devices runs/torchrun
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from depthkv.eval.results import load_rows, row_key  # noqa: E402

FIELDS = ("output", "score", "budgets")


def decided(folder: Path) -> dict[str, tuple[str, ...]]:
    """Cell key -> the JSON of the fields a run decides."""
    return {row_key(r): tuple(json.dumps(r.get(f), sort_keys=True) for f in FIELDS) for r in load_rows(folder)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path, help="eval output folders; the first is the reference")
    args = ap.parse_args(argv)
    if len(args.folders) < 2:
        ap.error("give at least two folders")
    ref = decided(args.folders[0])
    if not ref:
        print(f"{args.folders[0]}: no rows")
        return 1
    ok = True
    for folder in args.folders[1:]:
        rows = decided(folder)
        missing, extra = sorted(ref.keys() - rows.keys()), sorted(rows.keys() - ref.keys())
        differ = sorted(k for k in ref.keys() & rows.keys() if ref[k] != rows[k])
        same = not (missing or extra or differ)
        ok &= same
        print(f"{folder}: {len(rows)} rows vs {len(ref)}; identical: {same} "
              f"(missing {len(missing)}, extra {len(extra)}, different {len(differ)})")
        for k in (missing + extra + differ)[:10]:
            print(f"  {k}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
