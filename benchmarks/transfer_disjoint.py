"""Check that the transfer experiment's calibration and evaluation samples share nothing.

    python benchmarks/transfer_disjoint.py --out docs/results/transfer_smollm2/disjointness.json

Regenerates, with the SmolLM2 tokenizer, the calibration sets (split "calib": the mixed default profile's
32 samples and 16 each of needle and multikey) and the evaluation sets (split "eval": 12 needle + 12
multikey, ~1k tokens, seed 0) exactly as `depthkv calibrate` / `depthkv eval` build them, and counts what
the two sides share: sample ids, needle key words, answers (7-digit values) and haystack sentences
(sentences of at least 60 characters, after whitespace normalisation). Every count should be 0.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

SENTENCE = re.compile(r"(?<=[.!?])\s+")


def sentences(text: str, min_chars: int = 60) -> set[str]:
    return {s for s in (" ".join(x.split()) for x in SENTENCE.split(text)) if len(s) >= min_chars}


def keys(sample) -> set[str]:
    return set(sample.meta.get("keys") or [sample.meta.get("key")]) - {None}


def answers(sample) -> set[str]:
    return set(sample.meta.get("values") or [sample.answer])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--eval-samples", type=int, default=12)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()

    from depthkv.models import load_model
    from depthkv.tasks import calibration_mix, generate
    from depthkv.tasks.prompt import token_counter

    count = token_counter(load_model(args.model).tokenizer)
    calib = {
        "mix": calibration_mix(32, 0, 1024, count),
        "needle": generate("needle", 16, 0, context_tokens=1024, count_tokens=count, split="calib"),
        "multikey": generate("multikey", 16, 0, context_tokens=1024, count_tokens=count, split="calib"),
    }
    evals = [s for t in ("needle", "multikey")
             for s in generate(t, args.eval_samples, 0, context_tokens=1024, count_tokens=count, split="eval")]
    ev = {
        "ids": {s.id for s in evals}, "keys": set().union(*map(keys, evals)),
        "answers": set().union(*map(answers, evals)), "sentences": set().union(*(sentences(s.context) for s in evals)),
    }
    report = {"eval_samples": len(evals), "eval_sentences": len(ev["sentences"]), "profiles": {}}
    for name, group in calib.items():
        cal = {
            "ids": {s.id for s in group}, "keys": set().union(*map(keys, group)),
            "answers": set().union(*map(answers, group)),
            "sentences": set().union(*(sentences(s.context) for s in group)),
        }
        report["profiles"][name] = {
            "calib_samples": len(group), "calib_sentences": len(cal["sentences"]),
            **{f"shared_{k}": len(cal[k] & ev[k]) for k in ev},
        }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
