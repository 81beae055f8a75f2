"""The ``depthkv`` command line: the only module that knows every other package."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, add_args: Callable[[argparse.ArgumentParser], None]):
    """Register a sub-command: ``add_args`` fills its parser, the decorated function runs it."""

    def deco(fn: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = (add_args, fn)
        return fn

    return deco


def _dtype(name: str):
    import torch

    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise SystemExit(f"error: dtype must be float32, bfloat16 or float16, got {name!r}") from None


def _ratio(text: str) -> float:
    from depthkv.allocation.budgets import BudgetError, check_ratio

    try:
        return check_ratio(float(text))
    except (ValueError, BudgetError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="built-in alias, local folder or hub id")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="base attention implementation")


def add_press_args(p: argparse.ArgumentParser) -> None:
    from depthkv.scorers import SCORERS

    p.add_argument("--ratio", type=_ratio, default=0.6, help="share of the context's KV pairs removed, in [0, 1)")
    p.add_argument("--scorer", default="snapkv", choices=sorted(SCORERS), help="in-layer token scorer")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="chunked prefill: prune after every C tokens (paper: 1024); default post-prefill pruning")
    p.add_argument("--budgets", type=Path, default=None, help="JSON budget vector (overrides --ratio)")
    p.add_argument("--n-sink", type=int, default=4, help="protected first tokens per layer (inside the budget)")
    p.add_argument("--n-recent", type=int, default=16, help="protected most recent tokens per layer")
    p.add_argument("--protect-first-layer", action="store_true", help="never prune layer 0 (as the paper)")


def load(args: argparse.Namespace):
    from depthkv.models import load_model

    return load_model(args.model, dtype=_dtype(args.dtype), attn_implementation=args.attn)


def read_prompt(args: argparse.Namespace, tokenizer):
    """(description, input ids [1, T], expected answer or None) from --prompt-file, stdin or the built-in prompt."""
    from depthkv.prompts import builtin_prompt_ids, encode_chat

    text = None
    if args.prompt_file is not None:
        text, source = Path(args.prompt_file).read_text(), str(args.prompt_file)
    elif not args.builtin and not sys.stdin.isatty():
        text, source = sys.stdin.read(), "stdin"
    if text is not None:
        if not text.strip():
            raise SystemExit(f"error: the prompt from {source} is empty")
        return source, encode_chat(tokenizer, text), None
    ids, answer = builtin_prompt_ids(tokenizer, args.context_tokens)
    return f"built-in passkey prompt ({ids.shape[1]} tokens)", ids, answer


def _press_kwargs(args: argparse.Namespace, n_layers: int) -> dict:
    from depthkv.allocation import Budgets

    kw: dict = dict(scorer=args.scorer, n_sink=args.n_sink, n_recent=args.n_recent,
                    protected_layers=(0,) if args.protect_first_layer else ())
    if args.chunk_size is not None:
        kw.update(mode="chunked", chunk_size=args.chunk_size)
    if args.budgets is not None:
        kw["budgets"] = Budgets.load(args.budgets)
    else:
        kw["ratio"] = args.ratio
    return kw


def _generate_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_press_args(p)
    p.add_argument("--prompt-file", type=Path, default=None, help="prompt text file (else stdin, else built-in)")
    p.add_argument("--builtin", action="store_true", help="use the built-in long prompt even if stdin is piped")
    p.add_argument("--context-tokens", type=int, default=2048, help="length of the built-in prompt")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--sample", action="store_true", help="sample (temperature 0.7) instead of greedy decoding")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the result as JSON here")


@command("generate", _generate_args)
def cmd_generate(args: argparse.Namespace) -> int:
    """Generate with a pruned KV cache; print the answer and the KV memory kept vs full."""
    import torch

    import depthkv
    from depthkv.engine import full_kv_bytes

    lm = load(args)
    model, tok = lm.model, lm.tokenizer
    n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    kw = _press_kwargs(args, n_layers)
    pr = depthkv.press(model, **kw)  # validates before any work
    source, ids, expected = read_prompt(args, tok)
    torch.manual_seed(args.seed)
    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample, pad_token_id=tok.eos_token_id)
    if args.sample:
        gen.update(temperature=0.7, top_p=0.95)
    t0 = time.perf_counter()
    with pr:
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **gen)
        kept = pr.session.kept_kv_bytes
    seconds = time.perf_counter() - t0
    answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    n = ids.shape[1] - (1 if args.chunk_size else 0)
    full = full_kv_bytes(model, n)
    print(answer)
    if expected is not None:
        print(f"expected answer: {expected} ({'found' if expected in answer else 'not found'} in the output)")
    share = kept / full if kept is not None else 1.0
    print(f"KV bytes full / kept / share kept: {full:,} / {kept if kept is not None else full:,} / {share:.3f}"
          f"  (model {lm.name}, {n} context tokens, scorer {args.scorer}, "
          f"{'chunked C=' + str(args.chunk_size) if args.chunk_size else 'post-prefill'}, {seconds:.1f} s)")
    if args.json:
        args.json.write_text(json.dumps({
            "model": lm.name, "prompt": source, "context_tokens": n, "answer": answer, "expected": expected, "scorer": args.scorer,
            "budgets": pr.budgets.to_dict() if pr.budgets else None, "kv_bytes_full": full,
            "kv_bytes_kept": kept, "seconds": seconds, "version": depthkv.__version__,
        }, indent=2) + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="depthkv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_args, fn) in COMMANDS.items():
        p = sub.add_parser(name, help=(fn.__doc__ or "").strip().splitlines()[0])
        add_args(p)
        p.set_defaults(func=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    from depthkv.allocation.budgets import BudgetError
    from depthkv.models.errors import DepthKVModelError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (BudgetError, DepthKVModelError, FileNotFoundError, NotImplementedError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
