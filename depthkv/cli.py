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
    p.add_argument("--profile", type=Path, default=None, help="calibration profile (from depthkv calibrate)")
    p.add_argument("--strategy", default=None,
                   help="allocator splitting --ratio across layers (uniform, pyramid, mlp, mga, mlma-k, "
                        "proportional, optimal); default: optimal with --profile, else uniform")


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
        if args.profile or args.strategy:
            raise SystemExit("error: --budgets is an explicit vector; it cannot be combined with --profile/--strategy")
        kw["budgets"] = Budgets.load(args.budgets)
    else:
        kw.update(ratio=args.ratio, strategy=args.strategy, profile=args.profile)
    return kw


def _generate_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_press_args(p)
    p.add_argument("--prompt-file", type=Path, default=None, help="prompt text file (else stdin, else built-in)")
    p.add_argument("--builtin", action="store_true", help="use the built-in long prompt even if stdin is piped")
    p.add_argument("--context-tokens", type=int, default=2048, help="length of the built-in prompt")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--sample", action="store_true", help="sample (temperature 0.7) instead of greedy decoding")
    p.add_argument("--fast", action="store_true",
                   help="greedy decoding with fixed-size per-layer cache buffers (one CUDA graph per step on GPU); "
                        "llama/qwen2 families only, not with --sample")
    p.add_argument("--fast-compile", action="store_true",
                   help="with --fast on CUDA: torch.compile the per-layer element-wise parts once (~7 s) before the "
                        "graph capture; the configuration that reaches 1.5x the bytes-read bound (docs/benchmarks.md)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the result as JSON here")


@command("generate", _generate_args)
def cmd_generate(args: argparse.Namespace) -> int:
    """Generate with a pruned KV cache; print the answer and the KV memory kept vs full."""
    import torch

    import depthkv
    from depthkv.engine import full_kv_bytes
    from depthkv.engine.static import FastConfig, FastDecodeError

    if args.fast and args.sample:
        raise SystemExit("error: --fast decodes greedily; it cannot be combined with --sample")
    if args.fast_compile and not args.fast:
        raise SystemExit("error: --fast-compile only applies with --fast")
    lm = load(args)
    model, tok = lm.model, lm.tokenizer
    if args.fast_compile and model.device.type != "cuda":
        raise SystemExit(f"error: --fast-compile needs a CUDA device, the model is on {model.device.type}")
    n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    kw = _press_kwargs(args, n_layers)
    try:
        fast = FastConfig(compile=True) if args.fast_compile else args.fast
        pr = depthkv.press(model, fast=fast, **kw)  # validates before any work
    except FastDecodeError as exc:
        raise SystemExit(f"error: {exc}") from None
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
            "kv_bytes_kept": kept, "seconds": seconds, "fast": args.fast, "version": depthkv.__version__,
        }, indent=2) + "\n")
    return 0


def _calibrate_args(p: argparse.ArgumentParser) -> None:
    from depthkv.calibration.run import DEFAULT_PROBES

    add_model_args(p)
    p.add_argument("--data", default="mix",
                   help="calibration data: 'mix' (needle, multikey, vartrack, gsm_inf, code), a task name, or a "
                        "JSONL file of {context, question, answer} rows")
    p.add_argument("--scorer", default="snapkv")
    p.add_argument("--probe-ratios", default=",".join(str(r) for r in DEFAULT_PROBES),
                   help="comma-separated ratios in (0, 1]; 1 means only the protected window is left")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--context-tokens", type=int, default=1024)
    p.add_argument("--n-sink", type=int, default=4)
    p.add_argument("--n-recent", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--permutations", type=int, default=10_000)
    p.add_argument("--no-proxy", action="store_true", help="skip the paper's proxy metrics")
    p.add_argument("--infonce-tau", type=float, default=0.1, help="InfoNCE temperature (proxy metrics)")
    p.add_argument("--probe-batch", type=int, default=8,
                   help="single-layer probes per batched forward (memory vs speed; results are the same)")
    p.add_argument("--plots", type=Path, default=None, help="folder for the sensitivity plot (PNG)")
    p.add_argument("--out", type=Path, required=True, help="profile JSON to write")


@command("calibrate", _calibrate_args)
def cmd_calibrate(args: argparse.Namespace) -> int:
    """Measure per-layer pruning sensitivity once and write a profile."""
    from depthkv.calibration.report import print_summary
    from depthkv.calibration.run import CalibrationConfig, calibrate
    from depthkv.scorers import get_scorer

    try:
        probes = tuple(float(x) for x in args.probe_ratios.split(","))
    except ValueError:
        raise SystemExit(f"error: --probe-ratios must be numbers, got {args.probe_ratios!r}") from None
    if any(not 0 < r <= 1 for r in probes) or list(probes) != sorted(set(probes)):
        raise SystemExit(f"error: probe ratios must be increasing values in (0, 1], got {probes}")
    if args.samples < 2:
        raise SystemExit("error: --samples must be >= 2 (statistics need more than one sample)")
    if args.probe_batch < 1:
        raise SystemExit(f"error: --probe-batch must be >= 1, got {args.probe_batch}")
    get_scorer(args.scorer)
    cfg = CalibrationConfig(scorer=args.scorer, probe_ratios=probes, samples=args.samples,
                            context_tokens=args.context_tokens, data=args.data, seed=args.seed,
                            n_sink=args.n_sink, n_recent=args.n_recent, n_perm=args.permutations,
                            proxy=not args.no_proxy, proxy_tau=args.infonce_tau, probe_batch=args.probe_batch)
    lm = load(args)
    profile = calibrate(lm, cfg)
    profile.save(args.out)
    print_summary(profile)
    print(f"profile written to {args.out}")
    if args.plots:
        from depthkv.calibration.report import plot_sensitivity

        print(f"plot written to {plot_sensitivity(profile, args.plots)}")
    return 0


def _allocate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", type=Path, default=None)
    p.add_argument("--ratio", type=_ratio, required=True)
    p.add_argument("--strategy", default="optimal")
    p.add_argument("--context-tokens", type=int, default=2048, help="context length N the budgets are for")
    p.add_argument("--layers", type=int, default=None, help="layer count (only without --profile)")
    p.add_argument("--min-tokens", type=int, default=20, help="floor per layer (protected sinks + recent)")
    p.add_argument("--protect-first-layer", action="store_true")
    p.add_argument("--out", type=Path, default=None, help="budget JSON to write (for generate --budgets)")
    p.add_argument("--plot", type=Path, default=None, help="PNG of the allocation beside uniform")


@command("allocate", _allocate_args)
def cmd_allocate(args: argparse.Namespace) -> int:
    """Split one global KV budget across layers and print/save the budget vector."""
    from depthkv.allocation import allocate, uniform
    from depthkv.calibration.profile import Profile

    profile = Profile.load(args.profile) if args.profile else None
    n_layers = profile.n_layers if profile else args.layers
    if n_layers is None:
        raise SystemExit("error: give --profile or --layers")
    prot = (0,) if args.protect_first_layer else ()
    b = allocate(args.strategy, n_layers, args.context_tokens, args.ratio,
                 sensitivity=profile.view() if profile else None, protected=prot, min_tokens=args.min_tokens)
    u = uniform(n_layers, args.context_tokens, args.ratio, protected=prot, min_tokens=args.min_tokens)
    print(f"{args.strategy} at ratio {args.ratio} on {args.context_tokens} tokens: total {b.total} "
          f"(= round({n_layers} x {args.context_tokens} x {1 - args.ratio:.3f}))")
    print("layer  " + " ".join(f"{i:>5d}" for i in range(n_layers)))
    print("tokens " + " ".join(f"{t:>5d}" for t in b.tokens))
    print("uniform" + " ".join(f"{t:>5d}" for t in u.tokens))
    if args.out:
        b.save(args.out)
        print(f"budgets written to {args.out}")
    if args.plot:
        from depthkv.calibration.report import plot_allocation

        print(f"plot written to {plot_allocation(b, u, args.plot, profile)}")
    return 0


def _eval_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--tasks", default="needle,vartrack",
                   help="comma-separated tasks (needle, multikey, vartrack, gsm_inf, code_next_line, summarise, "
                        "jsonl:PATH)")
    p.add_argument("--methods", default="full,uniform,pyramid,optimal",
                   help="comma-separated: full (no pruning) and allocators (uniform, pyramid, mlp, mga, mlma-k, "
                        "proportional, optimal)")
    p.add_argument("--scorers", default="snapkv", help="comma-separated in-layer token scorers")
    p.add_argument("--ratios", default="0.2,0.4,0.6,0.8,0.9", help="comma-separated ratios (share removed)")
    p.add_argument("--samples", type=int, default=8, help="samples per task")
    p.add_argument("--context-tokens", type=int, default=1024)
    p.add_argument("--settings", default="aware", help="aware (question in the prefill), agnostic, or both")
    p.add_argument("--profile", type=Path, default=None,
                   help="calibration profile; needed by mga, mlma-k, proportional, optimal")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: per task (32-128)")
    p.add_argument("--protect-first-layer", action="store_true", help="never prune layer 0 (as the paper)")
    p.add_argument("--n-sink", type=int, default=4)
    p.add_argument("--n-recent", type=int, default=16)
    p.add_argument("--min-tokens", type=int, default=None,
                   help="least tokens a pruned layer keeps (default: the protected window, n-sink + n-recent)")
    p.add_argument("--task-options", default=None,
                   help='task generator options as JSON, e.g. \'{"needle": {"lengths": [512, 1024]}}\'')
    p.add_argument("--out", type=Path, required=True, help="results folder (resumed if it holds the same run)")
    p.add_argument("--force", action="store_true", help="start over in --out even if it holds another run")
    p.add_argument("--no-progress", action="store_true")


@command("eval", _eval_args)
def cmd_eval(args: argparse.Namespace) -> int:
    """Sweep tasks x methods x scorers x ratios (one prefill per sample and setting), resumable."""
    from depthkv.eval.results import EvalError

    try:
        return _eval(args)
    except EvalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted; finished cells are in {args.out}/results.jsonl; rerun the same command to resume",
              file=sys.stderr)
        return 130


def _eval(args: argparse.Namespace) -> int:
    from depthkv.eval.runner import EvalConfig, parse_list, parse_ratios, parse_task_options, run_eval
    from depthkv.eval.summary import print_summary, summarise, write_summary

    settings = parse_list(args.settings, "settings")
    if settings == ["both"]:
        settings = ["aware", "agnostic"]
    cfg = EvalConfig(
        model=args.model, tasks=parse_list(args.tasks, "tasks"), methods=parse_list(args.methods, "methods"),
        scorers=parse_list(args.scorers, "scorers"), ratios=parse_ratios(args.ratios), samples=args.samples,
        context_tokens=args.context_tokens, settings=settings,
        profile=str(args.profile) if args.profile else None, seed=args.seed, max_new_tokens=args.max_new_tokens,
        protect_first_layer=args.protect_first_layer, n_sink=args.n_sink, n_recent=args.n_recent,
        min_tokens=args.min_tokens, task_options=parse_task_options(args.task_options), dtype=args.dtype,
        attn=args.attn,
    )
    cfg.validate()  # before loading the model: bad names and a missing --profile fail at once
    lm = load(args)
    res = run_eval(lm, cfg, args.out, force=args.force, progress=not args.no_progress)
    cells = summarise(res.rows)
    write_summary(res.folder, cells, {"model": lm.name, "folder": str(res.folder)})
    print_summary(cells, title=f"{lm.name}: mean [95 % CI]; diff = method - uniform (paired over samples)")
    print(f"{res.new_rows} new rows ({res.skipped} resumed, {res.prefills} prefills) in {res.seconds:.0f} s; "
          f"results: {res.folder / 'results.jsonl'}, summary: {res.folder / 'summary.csv'}")
    return 0


def _report_args(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = (
        "Transfer matrix (profile calibrated on family A, evaluated on family B): calibrate one profile per\n"
        "family, evaluate each into its own folder on the same tasks, and report the folders together:\n"
        "  depthkv calibrate --data needle --out needle.json\n"
        "  depthkv calibrate --data code_next_line --out code.json\n"
        "  depthkv eval --profile needle.json --tasks needle,code_next_line --methods uniform,optimal --out runs/needle\n"
        "  depthkv eval --profile code.json --tasks needle,code_next_line --methods uniform,optimal --out runs/code\n"
        "  depthkv report runs/needle runs/code -o report.html\n"
        "Each cell: gain of the method over uniform on that task (mean over samples, 95 % bootstrap CI)."
    )
    p.add_argument("folders", nargs="+", type=Path,
                   help="evaluation folders (several with different profiles give a transfer matrix)")
    p.add_argument("-o", "--out", type=Path, default=Path("report.html"))
    p.add_argument("--no-embed", action="store_true", help="link the PNGs instead of embedding them")
    p.add_argument("--rows-csv", type=Path, default=None,
                   help="also write every row of the folders as a small CSV (method, task, sample, score, output)")


@command("report", _report_args)
def cmd_report(args: argparse.Namespace) -> int:
    """HTML report (plots, headline table with CIs, transfer matrix) from evaluation folders."""
    from depthkv.eval.report import build_report
    from depthkv.eval.results import EvalError, iter_rows, write_rows_csv

    try:
        path = build_report(args.folders, args.out, embed=not args.no_embed)
    except EvalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"report written to {path}")
    if args.rows_csv:
        rows = [row for _, row in iter_rows(args.folders)]
        print(f"{len(rows)} rows written to {write_rows_csv(rows, args.rows_csv)}")
    return 0


def _demo_args(p: argparse.ArgumentParser) -> None:
    from depthkv.eval.demo import DemoConfig

    d = DemoConfig()
    p.add_argument("--samples", type=int, default=d.samples, help="evaluation samples per task")
    p.add_argument("--calib-samples", type=int, default=d.calib_samples)
    p.add_argument("--context-tokens", type=int, default=d.context_tokens, help="evaluation context length")
    p.add_argument("--calib-context-tokens", type=int, default=d.calib_context_tokens)
    p.add_argument("--model", default=d.model)
    p.add_argument("--out", type=Path, default=Path(d.out))
    p.add_argument("--force", action="store_true", help="recalibrate and re-evaluate from scratch")


@command("demo", _demo_args)
def cmd_demo(args: argparse.Namespace) -> int:
    """The main job end to end: calibrate -> allocate -> eval -> report (SmolLM2, ~10 min on 2 CPUs)."""
    from depthkv.eval.demo import DemoConfig, run_demo
    from depthkv.eval.results import EvalError

    cfg = DemoConfig(model=args.model, samples=args.samples, calib_samples=args.calib_samples,
                     context_tokens=args.context_tokens, calib_context_tokens=args.calib_context_tokens,
                     out=str(args.out))
    try:
        path = run_demo(cfg, force=args.force)
    except EvalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted; rerun the same command to resume in {args.out}", file=sys.stderr)
        return 130
    return 0 if path.exists() else 1


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
    from depthkv.allocation.registry import AllocatorError
    from depthkv.calibration.profile import ProfileError
    from depthkv.models.errors import DepthKVModelError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (BudgetError, AllocatorError, ProfileError, DepthKVModelError, FileNotFoundError,
            NotImplementedError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
