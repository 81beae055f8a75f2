"""depthkv: layer-dependent KV-cache pruning for Hugging Face causal LMs (DepthKV, arXiv 2604.24647).

Layers differ in how much they suffer when their KV cache is pruned. depthkv measures each layer's
sensitivity once, then splits one global KV budget (--ratio = share of the context's KV pairs removed)
across layers: sensitive layers keep more tokens, robust ones are pruned harder.

Typical workflow:
  1. depthkv calibrate --model smollm2-135m --out profile.json       measure per-layer sensitivity (once)
  2. depthkv allocate --profile profile.json --ratio 0.6 --out b.json  look at / save the per-layer budgets
     depthkv generate --profile profile.json --ratio 0.6 < prompt.txt  answer a prompt with the pruned cache
  3. depthkv eval --profile profile.json --out runs/e1                compare with uniform and PyramidKV
  4. depthkv report runs/e1 -o report.html                           HTML report: tables with CIs, plots

'depthkv demo' runs all of it on the built-in offline model; 'depthkv COMMAND --help' explains a command.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}
# one runnable example per command, shown under its --help
EXAMPLES: dict[str, str] = {
    "generate": "depthkv generate --model smollm2-135m --ratio 0.6 --scorer snapkv --prompt-file prompt.txt\n"
                "  depthkv generate --builtin --profile profile.json --ratio 0.8 --chunk-size 1024",
    "calibrate": "depthkv calibrate --model smollm2-135m --data mix --samples 32 --out profile.json --plots plots/",
    "allocate": "depthkv allocate --profile profile.json --ratio 0.7 --strategy optimal --out budgets.json\n"
                "  depthkv generate --budgets budgets.json --prompt-file prompt.txt   (any prompt length)",
    "eval": "depthkv eval --model smollm2-135m --tasks needle,multikey --methods full,uniform,pyramid,optimal \\\n"
            "      --ratios 0.5,0.8 --samples 16 --profile profile.json --out runs/e1",
    "report": "depthkv report runs/e1 -o runs/e1/report.html",
    "demo": "depthkv demo --out runs/demo",
    "compress": "depthkv compress --context-file report.txt --ratio 0.6 --out ctx.dkv",
    "ask": 'depthkv ask ctx.dkv "Who signed the report?"',
}


def command(name: str, add_args: Callable[[argparse.ArgumentParser], None], example: str | None = None):
    """Register a sub-command: ``add_args`` fills its parser, the decorated function runs it; the function's
    docstring is the command's help, ``example`` a command line shown under it."""

    def deco(fn: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = (add_args, fn)
        if example:
            EXAMPLES[name] = example
        return fn

    return deco


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (exit code 2), pointing at --help."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(low: int) -> Callable[[str], int]:
    """argparse type: an integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


_positive = _int_at_least(1)
_non_negative = _int_at_least(0)


def _dtype(name: str, device="cpu"):
    """A --dtype value as a torch dtype (``auto``: bfloat16 on CUDA, float32 on the CPU)."""
    from depthkv.models.device import resolve_dtype

    return resolve_dtype(name, device)


def _ratio(text: str) -> float:
    from depthkv.allocation.budgets import BudgetError, check_ratio

    try:
        return check_ratio(float(text))
    except (ValueError, BudgetError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="built-in alias, name added with 'depthkv models add', local folder or hub id")
    p.add_argument("--device", default="auto", help="auto (CUDA when available, else CPU) | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16 | float16")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="base attention implementation")


def add_press_args(p: argparse.ArgumentParser) -> None:
    from depthkv.scorers import SCORERS

    p.add_argument("--ratio", type=_ratio, default=0.6, help="share of the context's KV pairs removed, in [0, 1)")
    p.add_argument("--scorer", default=None, choices=sorted(SCORERS),
                   help="in-layer token scorer (default: snapkv for generate, kvzip for compress)")
    p.add_argument("--scorer-options", default=None,
                   help='options of the scorer as JSON, in eval\'s form, e.g. \'{"kvzip": {"self_window": 1}}\' '
                        "(default: the profile's, for the scorer it was calibrated with)")
    p.add_argument("--chunk-size", type=_positive, default=None,
                   help="chunked prefill: prune after every C tokens (paper: 1024); default post-prefill pruning")
    p.add_argument("--budgets", type=Path, default=None,
                   help="JSON budget file from depthkv allocate --out (overrides --ratio; serves any prompt length)")
    p.add_argument("--n-sink", type=_non_negative, default=4,
                   help="protected first tokens per layer (inside the budget)")
    p.add_argument("--n-recent", type=_non_negative, default=16, help="protected most recent tokens per layer")
    p.add_argument("--protect-first-layer", action="store_true", help="never prune layer 0 (as the paper)")
    p.add_argument("--profile", type=Path, default=None, help="calibration profile (from depthkv calibrate)")
    p.add_argument("--strategy", default=None,
                   help="allocator splitting --ratio across layers (uniform, pyramid, mlp, mga, mlma-k, "
                        "proportional, optimal, optimal-joint; input-adaptive: global, adaptive, adaptive-joint); "
                        "default: optimal with --profile, else uniform; compress: adaptive with --profile, else "
                        "global")
    p.add_argument("--head-budgets", action=argparse.BooleanOptionalAction, default=None,
                   help="also split each layer's budget across its KV heads by their scores (post-prefill only; "
                        "default: on for compress, off for generate)")
    p.add_argument("--force-profile", action="store_true",
                   help="use --profile even if it was calibrated with another scorer or setting")


def load(args: argparse.Namespace):
    from depthkv.models import load_model

    device = getattr(args, "device", "auto")
    return load_model(args.model, dtype=_dtype(args.dtype, device), attn_implementation=args.attn, device=device)


def resolve_device_args(args: argparse.Namespace) -> None:
    """Turn --device/--dtype into concrete names (``cuda:0``, ``bfloat16``) before any work; bad ones raise
    ``DeviceError`` (one line, exit 2)."""
    if getattr(args, "device", None) is None or getattr(args, "devices", None) is not None:
        return  # eval --devices: each device is checked and its dtype resolved by the data-parallel runner
    from depthkv.models.device import dtype_name, resolve_device, resolve_dtype

    device = resolve_device(args.device)
    args.device = str(device)
    if getattr(args, "dtype", None) is not None:  # None: the command picks one later (ask: the file's dtype)
        args.dtype = dtype_name(resolve_dtype(args.dtype, device))


def read_prompt(args: argparse.Namespace, tokenizer):
    """(description, input ids [1, T], expected answer or None) from --prompt-file, stdin or the built-in prompt."""
    import torch

    from depthkv.prompts import builtin_prompt_ids
    from depthkv.tasks.prompt import encode_prompt

    text = None
    if args.prompt_file is not None:
        text, source = Path(args.prompt_file).read_text(), str(args.prompt_file)
    elif not args.builtin and not sys.stdin.isatty():
        print(STDIN_HINT, file=sys.stderr, flush=True)
        text, source = sys.stdin.read(), "stdin"
    if text is not None:
        if not text.strip():
            raise SystemExit(f"error: the prompt from {source} is empty")
        return source, torch.tensor([encode_prompt(tokenizer, text)], dtype=torch.long), None
    try:
        ids, answer = builtin_prompt_ids(tokenizer, args.context_tokens)
    except ValueError as exc:  # too short for a passkey and a haystack
        raise SystemExit(f"error: --context-tokens {args.context_tokens} is too short for the built-in prompt "
                         f"({exc})") from None
    return f"built-in passkey prompt ({ids.shape[1]} tokens)", ids, answer


STDIN_HINT = "reading the prompt from stdin (end with Ctrl-D; --builtin for the built-in prompt)"


def fit_context_window(ids, window: int | None, max_new_tokens: int, truncate: str | None):
    """``ids`` [1, T] if prompt plus new tokens fit the model's window (positions it was trained on), else an error
    line; with ``truncate="left"`` the prompt's end is kept instead (a note goes to stderr)."""
    if not window:
        return ids
    room = window - max_new_tokens
    if ids.shape[1] <= room:
        return ids
    if truncate != "left" or room < 1:
        raise SystemExit(
            f"error: the prompt has {ids.shape[1]:,} tokens; with --max-new-tokens {max_new_tokens} that is past the "
            f"model's context window of {window:,} tokens: shorten the prompt"
            + (" or lower --max-new-tokens" if room < 1 else f", or pass --truncate left to keep its last {room:,}")
        )
    print(f"note: the prompt has {ids.shape[1]:,} tokens, past the model's context window ({window:,}, "
          f"{max_new_tokens} kept free for the answer): dropped its first {ids.shape[1] - room:,} tokens "
          "(--truncate left)", file=sys.stderr)
    return ids[:, -room:]


def check_writable(path: Path | None, flag: str) -> None:
    """Fail at once, before any work, if ``path`` could not be written at the end."""
    import os

    if path is None:
        return
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise SystemExit(f"error: {flag} {path} is a folder; give a file path")
    if not folder.is_dir():
        raise SystemExit(f"error: {flag} {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise SystemExit(f"error: {flag} {path} is not writable")


def check_chunked(args: argparse.Namespace) -> None:
    """--chunk-size prunes chunk by chunk: refuse, in one line and before the model loads, what needs the whole
    context's scores first (the press's own rule, ``chunked_conflict``)."""
    from depthkv.engine.press import chunked_conflict
    from depthkv.scorers import get_scorer

    scorer = get_scorer(args.scorer, **getattr(args, "scorer_kwargs", {})) if args.scorer is not None else None
    why = chunked_conflict(scorer, args.head_budgets)
    if why:
        raise SystemExit(f"error: --chunk-size prunes chunk by chunk, but {why} (drop --chunk-size)")


def _press_kwargs(args: argparse.Namespace) -> dict:
    from depthkv.allocation import Budgets

    kw: dict = dict(scorer=args.scorer, n_sink=args.n_sink, n_recent=args.n_recent,
                    protected_layers=(0,) if args.protect_first_layer else (), head_budgets=args.head_budgets,
                    **getattr(args, "scorer_kwargs", {}))
    if args.chunk_size is not None:
        check_chunked(args)
        kw.update(mode="chunked", chunk_size=args.chunk_size)
    if args.budgets is not None:
        if args.profile or args.strategy:
            raise SystemExit("error: --budgets is an explicit vector; it cannot be combined with --profile/--strategy")
        kw["budgets"] = Budgets.load(args.budgets)
    else:
        kw.update(ratio=args.ratio, strategy=args.strategy, profile=args.profile, force_profile=args.force_profile)
    return kw


def check_profile_use(args: argparse.Namespace, setting: str) -> None:
    """Before loading the model: fill in the setting's default scorer when --scorer is not given, then refuse a
    --profile calibrated with another scorer or in another setting than this command prunes in (generate:
    aware, compress: agnostic); --force-profile skips the check."""
    from depthkv.allocation.defaults import press_defaults
    from depthkv.allocation.profile import Profile

    profile = Profile.load(args.profile) if args.profile is not None and args.budgets is None else None
    if args.scorer is None:  # the profile's own scorer when it was calibrated in this setting
        args.scorer = press_defaults(setting, profile).scorer
    args.scorer_kwargs = scorer_options_of(args.scorer_options, args.scorer)
    if profile is not None:
        profile.check_use(args.scorer, setting, force=args.force_profile)
        args.scorer_kwargs = profile.options_for(args.scorer, args.scorer_kwargs, force=args.force_profile)


def _generate_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_press_args(p)
    p.add_argument("--prompt-file", type=Path, default=None, help="prompt text file (else stdin, else built-in)")
    p.add_argument("--builtin", action="store_true", help="use the built-in long prompt even if stdin is piped")
    p.add_argument("--context-tokens", type=_positive, default=2048, help="length of the built-in prompt")
    p.add_argument("--truncate", choices=["left"], default=None,
                   help="a prompt longer than the model's context window is an error; 'left' keeps its end instead")
    p.add_argument("--max-new-tokens", type=_positive, default=48)
    p.add_argument("--sample", action="store_true", help="sample (temperature 0.7) instead of greedy decoding")
    p.add_argument("--fast", action="store_true",
                   help="greedy decoding with fixed-size per-layer cache buffers (one CUDA graph per step on GPU); "
                        "llama/qwen2 families only, not with --sample")
    p.add_argument("--fast-compile", action="store_true",
                   help="with --fast on CUDA: torch.compile the per-layer element-wise parts once (~7 s) before the "
                        "graph capture; the configuration that reaches 1.5x the bytes-read bound (docs/benchmarks.md)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the result as JSON here")


class GenerateProgress:
    """Progress of one ``generate`` call on stderr: the prefill (a bar over the prompt's tokens when chunked),
    then decoding, with timings.

    A forward hook on the model counts the tokens fed, so it sees the chunks of a chunked prefill and the
    prefill inside ``model.generate`` alike; the prefill is over once ``n_prefill`` tokens (default: the whole
    prompt; a chunked prefill leaves the last one to decoding) have been fed.
    """

    def __init__(self, model, n_prompt: int, mode: str, max_new_tokens: int, bar: bool = False,
                 n_prefill: int | None = None):
        self.model, self.n_prompt, self.mode, self.max_new_tokens = model, n_prompt, mode, max_new_tokens
        self.n_prefill = max(1, n_prefill if n_prefill is not None else n_prompt)
        self.fed = 0
        self.t0 = time.perf_counter()
        self.prefill_seconds: float | None = None
        self._bar_wanted = bar
        self._bar = None
        self._handle = None

    def __enter__(self) -> GenerateProgress:
        from tqdm.auto import tqdm

        print(f"prefill + pruning: {self.n_prompt:,} prompt tokens ({self.mode}) ...", file=sys.stderr, flush=True)
        if self._bar_wanted:
            self._bar = tqdm(total=self.n_prefill, desc="prefill", unit="tok", file=sys.stderr, leave=False,
                             mininterval=0.5, dynamic_ncols=True)
        self._handle = self.model.register_forward_hook(self._after_forward, with_kwargs=True)
        self.t0 = time.perf_counter()
        return self

    def _after_forward(self, module, args, kwargs, output) -> None:
        if self.prefill_seconds is not None:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        n = int(ids.shape[1]) if ids is not None else 0
        self.fed += n
        if self._bar is not None:
            self._bar.update(min(n, self.n_prefill - self._bar.n))
        if self.fed >= self.n_prefill:
            self.prefill_seconds = time.perf_counter() - self.t0
            self._close_bar()
            print(f"prefill done in {self.prefill_seconds:.1f} s; decoding up to {self.max_new_tokens} new tokens ...",
                  file=sys.stderr, flush=True)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._close_bar()

    def done(self, new_tokens: int) -> None:
        """The closing line: decoding time and speed."""
        total = time.perf_counter() - self.t0
        if self.prefill_seconds is None:  # a decoder that bypasses the model's forward (--fast)
            print(f"prefill and {new_tokens} new tokens in {total:.1f} s", file=sys.stderr)
            return
        decode = total - self.prefill_seconds
        rate = f" ({new_tokens / decode:.1f} tokens/s)" if decode > 0 and new_tokens else ""
        print(f"decoded {new_tokens} new tokens in {decode:.1f} s{rate}; {total:.1f} s in all", file=sys.stderr)


@command("generate", _generate_args)
def cmd_generate(args: argparse.Namespace) -> int:
    """Answer one prompt with a pruned KV cache; print the answer and the KV memory kept vs full."""
    import torch

    import depthkv
    from depthkv.engine import full_kv_bytes
    from depthkv.engine.static import FastConfig

    if args.fast and args.sample:
        raise SystemExit("error: --fast decodes greedily; it cannot be combined with --sample")
    if args.fast_compile and not args.fast:
        raise SystemExit("error: --fast-compile only applies with --fast")
    check_writable(args.json, "--json")
    check_profile_use(args, "aware")
    print(f"loading model {args.model} ...", file=sys.stderr, flush=True)
    t_load = time.perf_counter()
    lm = load(args)
    model, tok = lm.model, lm.tokenizer
    print(f"loaded {lm.name} in {time.perf_counter() - t_load:.1f} s", file=sys.stderr)
    if args.fast_compile and model.device.type != "cuda":
        raise SystemExit(f"error: --fast-compile needs a CUDA device, the model is on {model.device.type}")
    kw = _press_kwargs(args)
    try:
        fast = FastConfig(compile=True) if args.fast_compile else args.fast
        pr = depthkv.press(model, fast=fast, tokenizer=tok, setting="aware", **kw)  # validates before any work
    except ValueError as exc:  # FastDecodeError, BudgetError and bad press settings alike: one line
        raise SystemExit(f"error: {exc}") from None
    source, ids, expected = read_prompt(args, tok)
    ids = ids.to(model.device)
    window = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    ids = fit_context_window(ids, window, args.max_new_tokens, args.truncate)
    print(f"prompt: {source}, {ids.shape[1]:,} tokens", file=sys.stderr)
    torch.manual_seed(args.seed)
    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample, pad_token_id=tok.eos_token_id)
    if args.sample:
        gen.update(temperature=0.7, top_p=0.95)
    mode = f"chunked C={args.chunk_size}" if args.chunk_size else "post-prefill"
    t0 = time.perf_counter()
    with pr, GenerateProgress(model, ids.shape[1], mode, args.max_new_tokens, bar=bool(args.chunk_size),
                              n_prefill=ids.shape[1] - 1 if args.chunk_size else None) as progress:
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **gen)
        kept = pr.session.kept_kv_bytes  # measured on the cache the prefill handed to decoding
    seconds = time.perf_counter() - t0
    progress.done(int(out.shape[1] - ids.shape[1]))
    answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    n = ids.shape[1] - (1 if args.chunk_size else 0)  # chunked: generate feeds the prompt's last token itself
    full = full_kv_bytes(model, n)
    print(answer)
    if expected is not None:
        print(f"expected answer: {expected} ({'found' if expected in answer else 'not found'} in the output)")
    share = kept / full if kept is not None else 1.0
    print(f"KV bytes full / kept / share kept: {full:,} / {kept if kept is not None else full:,} / {share:.3f}"
          f"  (model {lm.name}, {ids.shape[1]} prompt tokens, {n} in the pruned cache, scorer {args.scorer}, "
          f"{mode}, {seconds:.1f} s)")
    if args.json:
        from depthkv.io import write_json

        write_json(args.json, {
            "model": lm.name, "prompt": source, "prompt_tokens": int(ids.shape[1]), "context_tokens": n,
            "answer": answer, "expected": expected, "scorer": args.scorer,
            "budgets": pr.budgets.to_dict() if pr.budgets else None, "kv_bytes_full": full,
            "kv_bytes_kept": kept, "seconds": seconds, "fast": args.fast, "version": depthkv.__version__,
        })
    return 0


class CliError(Exception):
    """Bad input found by a command: ``main`` prints its one line and exits with code 2."""


def _read_text(path: Path, what: str) -> str:
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"cannot read the {what} file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not text.strip():
        raise CliError(f"the {what} file {path} is empty")
    return text


def _compress_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_press_args(p)
    p.add_argument("--context-file", type=Path, required=True,
                   help="text file holding the context; questions come later, with depthkv ask")
    p.add_argument("--out", type=Path, required=True, help="compressed context to write (one safetensors file)")


@command("compress", _compress_args)
def cmd_compress(args: argparse.Namespace) -> int:
    """Prefill and prune a context once and save it; answer questions from it later with depthkv ask."""
    import torch

    import depthkv
    from depthkv.tasks.prompt import context_prompt_ids

    text = _read_text(args.context_file, "context")
    check_writable(args.out, "--out")
    check_profile_use(args, "agnostic")
    lm = load(args)
    model, tok = lm.model, lm.tokenizer
    if tok is None:
        raise CliError(f"model {lm.name} has no tokenizer; compress needs one to encode the context")
    pr = depthkv.press(model, tokenizer=tok, setting="agnostic", **_press_kwargs(args))
    ids = torch.tensor([context_prompt_ids(tok, text)], dtype=torch.long, device=model.device)
    t0 = time.perf_counter()
    comp = pr.compress(ids)
    seconds = time.perf_counter() - t0
    comp.model["name"] = lm.name
    comp.context_text = text
    try:
        path = comp.save(args.out)
    except OSError as exc:
        raise CliError(f"cannot write {args.out}: {exc.strerror or exc}") from None
    full, kept = comp.full_kv_bytes(), comp.kv_bytes()
    c = pr.config
    split = f"strategy {c.strategy}" if c.strategy else "budgets from --budgets"
    print(f"context: {comp.n_tokens} tokens ({args.context_file}); model {lm.name}, scorer {args.scorer}, {split}"
          f"{', per-head budgets' if c.head_budgets else ''}, "
          f"{'chunked C=' + str(args.chunk_size) if args.chunk_size else 'post-prefill'}, {seconds:.1f} s")
    ragged = comp.kv_bytes_ragged()
    pairs = f"; KV pairs really kept (per-head budgets, without padding): {ragged:,} / {ragged / full:.3f}"
    print(f"KV bytes full / kept / share kept: {full:,} / {kept:,} / {kept / full:.3f}"
          f"{pairs if ragged != kept else ''}")
    print(f"compressed context written to {path} ({path.stat().st_size:,} bytes); ask with: depthkv ask {path} "
          '"your question"')
    return 0


def _ask_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("context", type=Path, help="compressed context file (from depthkv compress)")
    p.add_argument("question", nargs="?", default=None, help="the question (or --questions-file)")
    p.add_argument("--questions-file", type=Path, default=None, help="one question per line, one answer each")
    p.add_argument("--model", default=None, help="default: the model recorded in the file")
    p.add_argument("--device", default="auto", help="auto (CUDA when available, else CPU) | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16; default: the file's cache dtype")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="base attention implementation")
    p.add_argument("--max-new-tokens", type=_positive, default=48)
    p.add_argument("--json", type=Path, default=None, help="also write the questions and answers as JSON here")


def _questions(args: argparse.Namespace) -> list[str]:
    if (args.question is None) == (args.questions_file is None):
        raise CliError("give exactly one of a question argument or --questions-file")
    if args.question is not None:
        if not args.question.strip():
            raise CliError("the question is empty")
        return [args.question.strip()]
    return [q.strip() for q in _read_text(args.questions_file, "questions").splitlines() if q.strip()]


@command("ask", _ask_args)
def cmd_ask(args: argparse.Namespace) -> int:
    """Answer questions from a compressed context (depthkv compress) without prefilling it again."""
    import warnings

    import torch

    import depthkv
    from depthkv.engine import clone_cache, generate_from_cache
    from depthkv.engine.compressed import CompressedContext, CompressedContextWarning, read_header
    from depthkv.io import write_json
    from depthkv.tasks.prompt import context_prompt_ids, split_prompt

    questions = _questions(args)
    check_writable(args.json, "--json")
    header = read_header(args.context)
    text = header["context"].get("text") if isinstance(header["context"], dict) else None
    if not text:
        raise CliError(f"{args.context} holds no context text (saved without it); ask needs it to place the "
                       "question exactly as the full prompt would; answer from Python with Press.answer")
    args.model = args.model or header["model"].get("name")
    args.dtype = args.dtype or header["dtype"]
    lm = load(args)
    model, tok = lm.model, lm.tokenizer
    if tok is None:
        raise CliError(f"model {lm.name} has no tokenizer; ask needs one to encode the questions")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CompressedContextWarning)
        comp = CompressedContext.load(args.context, model)
    if comp.note:
        print(f"note: {comp.note}", file=sys.stderr)
    context_ids = comp.context_ids[0].tolist()
    if comp.context_ids.shape[0] != 1 or context_prompt_ids(tok, text) != context_ids:
        raise CliError(f"the tokenizer of {lm.name} does not reproduce the context's tokens stored in "
                       f"{args.context}: it was compressed with another tokenizer")
    results = []
    for i, question in enumerate(questions):
        ctx, q_ids = split_prompt(tok, text, question)
        if ctx != context_ids:
            raise CliError(f"question {i + 1}: its first token merges with the end of the context, so it cannot "
                           "be appended to the compressed context unchanged; start it with a word")
        ids = torch.cat([comp.context_ids, torch.tensor([q_ids], dtype=torch.long, device=comp.context_ids.device)], 1)
        t0 = time.perf_counter()
        out = generate_from_cache(model, clone_cache(comp.cache), ids, max_new_tokens=args.max_new_tokens,
                                  do_sample=False, pad_token_id=tok.eos_token_id)
        answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        results.append({"question": question, "answer": answer, "seconds": time.perf_counter() - t0})
    for r in results:
        print(r["answer"] if len(results) == 1 else f"Q: {r['question']}\nA: {r['answer']}\n")
    full, kept = comp.full_kv_bytes(), comp.kv_bytes()
    print(f"(model {lm.name}, {comp.n_tokens} context tokens, KV bytes kept {kept:,} of {full:,}, "
          f"{len(results)} question(s), {sum(r['seconds'] for r in results):.1f} s)", file=sys.stderr)
    if args.json:
        write_json(args.json, {
            "model": lm.name, "context_file": str(args.context), "context_tokens": comp.n_tokens,
            "kv_bytes_full": full, "kv_bytes_kept": kept, "compression": header.get("compression"),
            "budgets": header.get("budgets"), "answers": results, "version": depthkv.__version__,
        })
    return 0


def _calibrate_args(p: argparse.ArgumentParser) -> None:
    from depthkv.allocation.profile import SETTINGS
    from depthkv.calibration.run import DEFAULT_PROBES
    from depthkv.scorers import SCORERS

    add_model_args(p)
    p.add_argument("--data", default="mix",
                   help="calibration data: 'mix' (needle, multikey, vartrack, gsm_inf, code), a task name, or a "
                        "JSONL file of {context, question, answer} rows")
    p.add_argument("--scorer", default=None, choices=sorted(SCORERS),
                   help="token scorer the probes prune with; use the profile with the same scorer (default: the "
                        "setting's measured best: snapkv for aware; kvzip_vc with diversity 0.5 and the question "
                        "blend, question_weight 0.5, for agnostic)")
    p.add_argument("--scorer-options", default=None,
                   help='options of --scorer as JSON, in eval\'s form, e.g. \'{"kvzip_v": {"value_weight": 1.0}}\' '
                        "(recorded in the profile); KVzip's question_weight without question_queries records "
                        "them from the calibration samples into <out stem>.queries.safetensors first")
    p.add_argument("--setting", default="aware", choices=SETTINGS,
                   help="aware: the question is inside the pruned prefill (generate, eval --settings aware); "
                        "agnostic: only the context is pruned, the question follows (compress/ask, "
                        "eval --settings agnostic)")
    p.add_argument("--probe-ratios", default=",".join(str(r) for r in DEFAULT_PROBES),
                   help="comma-separated ratios in (0, 1]; 1 means only the protected window is left")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--context-tokens", type=_positive, default=1024)
    p.add_argument("--n-sink", type=_non_negative, default=4)
    p.add_argument("--n-recent", type=_non_negative, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--permutations", type=_positive, default=10_000)
    p.add_argument("--no-proxy", action="store_true", help="skip the paper's proxy metrics")
    p.add_argument("--infonce-tau", type=float, default=0.1, help="InfoNCE temperature (proxy metrics)")
    p.add_argument("--probe-batch", type=int, default=8,
                   help="single-layer probes per batched forward (memory vs speed; results are the same)")
    p.add_argument("--plots", type=Path, default=None, help="folder for the sensitivity plot (PNG)")
    p.add_argument("--refine-ratios", default=None,
                   help="comma-separated ratios: after the profile, refine the optimal budgets there on the joint "
                        "degradation of all layers pruned (same samples; read by --strategy optimal-joint)")
    p.add_argument("--floor-shares", default=None, metavar="GRID",
                   help="with --refine-ratios: also choose adaptive's floor share there among these (e.g. "
                        "0,0.25,0.5,0.75,1; lowest joint KL on the same samples, per-KV-head budgets)")
    p.add_argument("--out", type=Path, required=True, help="profile JSON to write")


def check_calibration_data(data: str) -> None:
    """Fail before loading the model unless --data is 'mix', a built-in task or a valid JSONL file."""
    from depthkv.tasks import TASKS
    from depthkv.tasks.jsonl import TaskDataError, load_jsonl

    if data == "mix":
        return
    if Path(data).suffix == ".jsonl":
        try:
            load_jsonl(data)
        except (TaskDataError, FileNotFoundError, UnicodeDecodeError) as exc:
            raise SystemExit(f"error: --data {exc}") from None
        return
    if data not in TASKS or data == "jsonl":
        known = ", ".join(sorted(t for t in TASKS if t != "jsonl"))
        raise SystemExit(f"error: unknown calibration data {data!r}: give 'mix', a task ({known}) or a .jsonl file")


@command("calibrate", _calibrate_args)
def cmd_calibrate(args: argparse.Namespace) -> int:
    """Measure per-layer pruning sensitivity once and write a profile."""
    from depthkv.calibration.report import print_summary
    from depthkv.calibration.run import CalibrationConfig, calibrate
    from depthkv.extras import pyplot

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
    given = parse_scorer_options(args.scorer_options)
    if args.scorer is None:  # the setting's measured-best scorer and options; options given for it take precedence
        from depthkv.allocation.defaults import CALIBRATION_SCORERS

        args.scorer, defaults = CALIBRATION_SCORERS[args.setting]
        if defaults and isinstance(given.get(args.scorer, {}), dict):
            given[args.scorer] = {**defaults, **given.get(args.scorer, {})}
    auto_queries = _auto_question_queries(given, args.scorer, args.out)
    options = checked_scorer_options(given, args.scorer)
    check_calibration_data(args.data)
    if args.plots:
        pyplot("--plots")  # before the calibration: a missing extra is said at once
    refine = _ratio_list(args.refine_ratios, "--refine-ratios") if args.refine_ratios else ()
    floors = _floor_grid(args.floor_shares) if args.floor_shares is not None else ()
    if floors and not refine:
        raise CliError("--floor-shares are tuned at the refined ratios: give --refine-ratios too")
    cfg = CalibrationConfig(scorer=args.scorer, scorer_options=options, setting=args.setting, probe_ratios=probes,
                            samples=args.samples,
                            refine_ratios=refine, floor_shares=floors,
                            context_tokens=args.context_tokens, data=args.data, seed=args.seed,
                            n_sink=args.n_sink, n_recent=args.n_recent, n_perm=args.permutations,
                            proxy=not args.no_proxy, proxy_tau=args.infonce_tau, probe_batch=args.probe_batch)
    lm = load(args)
    if auto_queries is not None:  # where this calibration's own questions look, for KVzip's question blend
        _record_question_queries(lm, args.data, args.samples, args.context_tokens, args.seed, auto_queries)
    try:
        profile = calibrate(lm, cfg)
    except BaseException:
        if auto_queries is not None:
            auto_queries.unlink(missing_ok=True)
        raise
    profile.save(args.out)
    print_summary(profile)
    print(f"profile written to {args.out}")
    if args.plots:
        from depthkv.calibration.report import plot_sensitivity

        print(f"plot written to {plot_sensitivity(profile, args.plots)}")
    return 0


def _question_queries_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--data", default="mix",
                   help="calibration data: 'mix', a task name, or a JSONL file of {context, question, answer} rows")
    p.add_argument("--samples", type=_positive, default=32)
    p.add_argument("--context-tokens", type=_positive, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="question-queries file to write (safetensors)")


@command("question-queries", _question_queries_args,
         "depthkv question-queries --model qwen2.5-coder-1.5b --samples 32 --context-tokens 4096 --out q.safetensors")
def cmd_question_queries(args: argparse.Namespace) -> int:
    """Record where calibration questions look (mean pre-RoPE query per layer and head), for KVzip's
    question_weight option."""
    check_calibration_data(args.data)
    _record_question_queries(load(args), args.data, args.samples, args.context_tokens, args.seed, args.out)
    return 0


def _record_question_queries(lm, data: str, samples: int, context_tokens: int, seed: int, out: Path) -> None:
    """Record the mean question query of ``samples`` calibration items (question after the context) to ``out``."""
    from depthkv.calibration.queries import record_question_queries
    from depthkv.calibration.run import CalibrationConfig, load_items

    cfg = CalibrationConfig(data=data, samples=samples, context_tokens=context_tokens, setting="agnostic", seed=seed)
    items, desc = load_items(lm.tokenizer, cfg, next(lm.model.parameters()).device)
    meta = {"model": lm.identity, "data": {k: desc[k] for k in ("description", "sha256", "n_samples", "tasks")}}
    queries = record_question_queries(lm.model, items, meta)
    queries.save(out)
    print(f"question queries ({len(items)} samples, {tuple(queries.table.shape)} layers x heads x dim) written to "
          f"{out}")


def _auto_question_queries(options: dict, scorer: str, out: Path) -> Path | None:
    """calibrate's scorer options: a ``question_weight`` given without ``question_queries`` gets the file
    ``<out stem>.queries.safetensors`` (set in ``options``), to be recorded from the calibration's own samples
    before it runs; returns that path (None: nothing to record)."""
    mine = options.get(scorer)
    if not isinstance(mine, dict) or not mine.get("question_weight") or mine.get("question_queries"):
        return None
    path = out.with_name(out.stem + ".queries.safetensors")
    options[scorer] = {**mine, "question_queries": str(path)}
    return path


def _ratio_list(text: str, flag: str) -> tuple[float, ...]:
    """Comma-separated pruning ratios, each in (0, 1) and listed once (BudgetError or CliError otherwise)."""
    from depthkv.calibration.refine import check_ratios

    try:
        ratios = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CliError(f"{flag} must be comma-separated numbers, got {text!r}") from None
    return check_ratios(1, [], ratios, 1)


def _refine_args(p: argparse.ArgumentParser) -> None:
    from depthkv.calibration.floors import STRATEGIES
    from depthkv.calibration.refine import RefineConfig

    add_model_args(p)
    p.set_defaults(model=None)
    p.add_argument("--profile", type=Path, required=True, help="calibration profile to add refined budgets to")
    p.add_argument("--ratios", required=True, help="comma-separated ratios to refine at, e.g. 0.8,0.9")
    p.add_argument("--samples", type=_positive, default=None,
                   help="calibration samples (default: the profile's; re-created from its recorded data and seed)")
    p.add_argument("--rounds", type=_positive, default=RefineConfig.rounds, help="probe + move rounds per ratio")
    p.add_argument("--batch", type=_positive, default=RefineConfig.batch, help="probe rows per batched forward")
    p.add_argument("--floor-shares", default=None, metavar="GRID",
                   help="comma-separated floor shares in [0, 1], e.g. 0,0.25,0.5,0.75,1: after refining, choose the "
                        "floor share of --floor-strategy at each of --ratios on the same samples (lowest joint KL, "
                        "per-KV-head budgets) and store it in the profile; default: not tuned")
    p.add_argument("--floor-strategy", default="adaptive", choices=STRATEGIES,
                   help="the input-adaptive allocator whose floor share --floor-shares tunes")
    p.add_argument("--floor-only", action="store_true",
                   help="tune the floor shares alone, without refining the budgets again (adaptive-joint needs "
                        "--ratios the profile is already refined at)")
    p.add_argument("--out", type=Path, default=None, help="profile to write (default: update --profile in place)")


@command("refine", _refine_args,
         example="depthkv refine --profile profile.json --ratios 0.8,0.9 --model smollm2-135m\n"
                 "  depthkv refine --profile profile.json --ratios 0.8,0.9 --floor-shares 0,0.25,0.5,0.75,1")
def cmd_refine(args: argparse.Namespace) -> int:
    """Refine a profile's optimal budgets on the joint degradation of all layers pruned (strategy optimal-joint);
    with --floor-shares, also choose the floor share of the adaptive allocators there."""
    from depthkv.allocation.profile import Profile
    from depthkv.calibration.floors import tune_profile
    from depthkv.calibration.refine import (
        RefineConfig,
        RefineError,
        check_ratios,
        prepare_samples,
        profile_scoring,
        recorded_config,
        recreate_items,
        refine_profile,
    )
    from depthkv.models.identity import model_identity

    ratios = _ratio_list(args.ratios, "--ratios")
    grid = _floor_grid(args.floor_shares) if args.floor_shares is not None else ()
    if args.floor_only and not grid:
        raise CliError("--floor-only tunes the floor shares: give --floor-shares too")
    profile = Profile.load(args.profile)
    out = args.out or args.profile
    check_writable(out, "--out")
    cfg = RefineConfig(rounds=args.rounds, batch=args.batch)
    prot = profile.data.get("protection") or {}
    floor = max(1, int(prot.get("n_sink", 4)) + int(prot.get("n_recent", 16)))
    check_ratios(profile.n_layers, profile.data.get("context_lens") or [], ratios, floor)
    if args.floor_only and args.floor_strategy == "adaptive-joint":
        _check_refined(profile, ratios, args.floor_strategy)
    try:
        recorded_config(profile, args.samples)
        args.model = args.model or profile.data["model"].get("name")
        lm = load(args)
        profile.check_model(model_identity(lm.model, lm.name))
        items, data = recreate_items(profile, lm.tokenizer, args.samples, next(lm.model.parameters()).device)
    except RefineError as exc:
        raise CliError(str(exc)) from None
    t0 = time.perf_counter()
    from tqdm.auto import tqdm

    # one scored prefill and reference pass per sample, shared by refinement and floor tuning (minutes at 4k on a CPU)
    samples = prepare_samples(lm.model, tqdm(items, desc="prefill + score", unit="sample", mininterval=2.0),
                              *profile_scoring(profile, lm.model))
    if not args.floor_only:
        results = refine_profile(profile, lm.model, items, ratios, cfg, data=data, samples=samples)
        _print_refined(results)
    if grid:
        floors = tune_profile(profile, lm.model, samples, ratios, grid, args.floor_strategy, batch=args.batch)
        _print_floor_shares(floors, args.floor_strategy)
    profile.save(out)
    what = [] if args.floor_only else [("refined budgets", "optimal-joint")]
    what += [(f"floor shares of {args.floor_strategy}", args.floor_strategy)] if grid else []
    print(f"{len(items)} calibration samples, {time.perf_counter() - t0:.0f} s; {' and '.join(w for w, _ in what)} "
          f"written to {out} (use --strategy {' or '.join(s for _, s in what)})")
    return 0


def _floor_grid(text: str) -> tuple[float, ...]:
    """``--floor-shares``: candidate floor shares in [0, 1] (CliError otherwise)."""
    from depthkv.calibration.floors import FloorError, parse_grid

    try:
        return parse_grid(text)
    except FloorError as exc:
        raise CliError(f"--floor-shares: {exc}") from None


def _check_refined(profile, ratios, strategy: str) -> None:
    """Refuse, before loading the model, ratios the profile holds no refined split for."""
    from depthkv.allocation.sensitivity import SensitivityError

    view = profile.view()
    try:
        for r in ratios:
            view.refined_shares(r, strategy)
    except SensitivityError as exc:
        raise CliError(str(exc)) from None


def _print_refined(results) -> None:
    print(f"{'ratio':>5}  {'joint KL optimal':>16}  {'joint KL refined':>16}  {'change':>7}  moves  seconds")
    for r, res in results.items():
        change = (res.joint_kl_refined / res.joint_kl_start - 1) if res.joint_kl_start > 0 else 0.0
        print(f"{r:>5g}  {res.joint_kl_start:>16.4f}  {res.joint_kl_refined:>16.4f}  {change:>+7.1%}  "
              f"{res.accepted:>5d}  {res.seconds:>7.1f}")


def _print_floor_shares(results, strategy: str) -> None:
    """Per ratio: the mean joint KL of every floor share tried, and the one chosen."""
    shares = list(next(iter(results.values())).kl)
    print(f"floor share of {strategy} (mean joint KL, per-KV-head budgets):")
    print(f"{'ratio':>5}  " + "  ".join(f"{s:>8g}" for s in shares) + "  chosen")
    for r, res in results.items():
        print(f"{r:>5g}  " + "  ".join(f"{res.kl[s]:>8.4g}" for s in shares) + f"  {res.share:>6g}")


def _allocate_args(p: argparse.ArgumentParser) -> None:
    from depthkv.allocation.profile import SETTINGS
    from depthkv.scorers import SCORERS

    p.add_argument("--profile", type=Path, default=None)
    p.add_argument("--scorer", default=None, choices=sorted(SCORERS),
                   help="scorer the budgets will be used with: refused unless the profile was calibrated with it")
    p.add_argument("--setting", default=None, choices=SETTINGS,
                   help="setting the budgets will be used in: refused unless the profile was calibrated in it")
    p.add_argument("--force-profile", action="store_true",
                   help="allocate from the profile even if its scorer or setting differs from --scorer/--setting")
    p.add_argument("--ratio", type=_ratio, required=True)
    p.add_argument("--strategy", default="optimal")
    p.add_argument("--context-tokens", type=_positive, default=2048,
                   help="context length N the printed budgets are for (the --out file serves any length)")
    p.add_argument("--layers", type=_positive, default=None, help="layer count (only without --profile)")
    p.add_argument("--min-tokens", type=_positive, default=20, help="floor per layer (protected sinks + recent)")
    p.add_argument("--protect-first-layer", action="store_true")
    p.add_argument("--out", type=Path, default=None,
                   help="budget JSON to write for generate --budgets: tokens for N plus per-layer shares, so "
                        "generate recomputes exact budgets for any prompt length")
    p.add_argument("--plot", type=Path, default=None, help="PNG of the allocation beside uniform")


@command("allocate", _allocate_args)
def cmd_allocate(args: argparse.Namespace) -> int:
    """Split one global KV budget across layers and print/save the budget vector."""
    from depthkv.allocation import BudgetSpec
    from depthkv.allocation.profile import Profile
    from depthkv.extras import pyplot

    check_writable(args.out, "--out")
    if args.plot:
        pyplot("--plot")
    profile = Profile.load(args.profile) if args.profile else None
    n_layers = profile.n_layers if profile else args.layers
    if n_layers is None:
        raise SystemExit("error: give --profile or --layers")
    if profile is None and (args.scorer or args.setting):
        raise SystemExit("error: --scorer and --setting are checked against a --profile; give one")
    if profile is not None:
        profile.check_use(args.scorer, args.setting, force=args.force_profile)
        print(f"profile {args.profile}: calibrated with scorer {profile.scorer_name or '(not recorded)'} in the "
              f"{profile.setting} setting; use these budgets the same way")
    prot = (0,) if args.protect_first_layer else ()
    b = BudgetSpec(args.ratio, args.strategy, profile, prot, args.min_tokens).for_context(n_layers, args.context_tokens)
    u = BudgetSpec(args.ratio, "uniform", None, prot, args.min_tokens).for_context(n_layers, args.context_tokens)
    print(f"{args.strategy} at ratio {args.ratio} on {args.context_tokens} tokens: total {b.total} "
          f"(= round({n_layers} x {args.context_tokens} x {1 - args.ratio:.3f}))")
    print("layer  " + " ".join(f"{i:>5d}" for i in range(n_layers)))
    print("tokens " + " ".join(f"{t:>5d}" for t in b.tokens))
    print("uniform" + " ".join(f"{t:>5d}" for t in u.tokens))
    if args.out:
        import dataclasses

        dataclasses.replace(b, min_tokens=args.min_tokens).save(args.out)  # the floor holds at every length
        print(f"budgets written to {args.out}")
    if args.plot:
        from depthkv.calibration.report import plot_allocation

        print(f"plot written to {plot_allocation(b, u, args.plot, profile)}")
    return 0


def _eval_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--tasks", default="needle,vartrack",
                   help="comma-separated tasks (needle, multikey, vartrack, gsm_inf, code_next_line, summarise, "
                        "multihop, docqa, jsonl:PATH)")
    p.add_argument("--methods", default="full,uniform,pyramid,optimal",
                   help="comma-separated: full (no pruning) and allocators (uniform, pyramid, mlp, mga, mlma-k, "
                        "proportional, optimal, optimal-joint)")
    p.add_argument("--scorers", default=None,
                   help="comma-separated in-layer token scorers (default: snapkv with the question in the prefill, "
                        "kvzip for --settings agnostic, both for both settings)")
    p.add_argument("--ratios", default="0.2,0.4,0.6,0.8,0.9", help="comma-separated ratios (share removed)")
    p.add_argument("--samples", type=int, default=8, help="samples per task")
    p.add_argument("--context-tokens", type=int, default=1024)
    p.add_argument("--settings", default="aware", help="aware (question in the prefill), agnostic, or both")
    p.add_argument("--profile", type=Path, default=None,
                   help="calibration profile; needed by mga, mlma-k, proportional, optimal")
    p.add_argument("--force-profile", action="store_true",
                   help="use --profile for --scorers/--settings other than it was calibrated with")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: per task (32-128)")
    p.add_argument("--protect-first-layer", action="store_true", help="never prune layer 0 (as the paper)")
    p.add_argument("--n-sink", type=int, default=4)
    p.add_argument("--n-recent", type=int, default=16)
    p.add_argument("--min-tokens", type=int, default=None,
                   help="least tokens a pruned layer keeps (default: the protected window, n-sink + n-recent)")
    p.add_argument("--task-options", default=None,
                   help='task generator options as JSON, e.g. \'{"needle": {"lengths": [512, 1024]}}\'')
    p.add_argument("--scorer-options", default=None,
                   help='scorer options as JSON per scorer, e.g. \'{"kvzip_v": {"value_weight": 1.0}}\'')
    p.add_argument("--out", type=Path, required=True, help="results folder (resumed if it holds the same run)")
    p.add_argument("--force", action="store_true", help="start over in --out even if it holds another run")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--devices", default=None,
                   help="data-parallel: comma-separated devices, one worker process each, e.g. 0,1 (CUDA) or "
                        "cpu,cpu; samples are sharded, rows merged into results.jsonl (or run under torchrun)")
    p.add_argument("--decode", default="auto", choices=["auto", "hf", "fast"],
                   help="hf: model.generate per cell; fast: a sample's cells decoded together as one batch of the "
                        "fixed-shape fast path; auto: fast for the families it supports (Llama, Qwen2), else hf")
    p.add_argument("--decode-batch", type=int, default=32, help="cells decoded together with --decode fast")


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


def parse_list(text: str, what: str) -> list[str]:
    """``--tasks a,b`` -> ``["a", "b"]`` (blanks dropped); an empty list is an error."""
    items = [x.strip() for x in str(text).split(",") if x.strip()]
    if not items:
        raise CliError(f"--{what} is empty")
    return items


def parse_ratios(text: str) -> list[float]:
    """``--ratios 0.5,0.8`` -> ``[0.5, 0.8]``; the ratio range is checked by ``EvalConfig.validate``."""
    out = []
    for x in parse_list(text, "ratios"):
        try:
            out.append(float(x))
        except ValueError:
            raise CliError(f"--ratios must be numbers, got {x!r}") from None
    return out


def parse_json_object(text: str | None, flag: str, example: str) -> dict:
    """A flag's JSON object (``{}`` when not given); anything else is one CliError line showing ``example``."""
    if not text:
        return {}
    try:
        d = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(f"{flag} must be a JSON object like '{example}': {exc}") from None
    if not isinstance(d, dict):
        raise CliError(f"{flag} must be a JSON object like '{example}', got {text!r}")
    return d


def parse_task_options(text: str | None) -> dict[str, dict]:
    """``--task-options '{"needle": {"lengths": [512, 1024]}}'`` (a JSON object of objects)."""
    d = parse_json_object(text, "--task-options", '{"needle": {"lengths": [512]}}')
    if not all(isinstance(v, dict) for v in d.values()):
        raise CliError("--task-options must map task names to objects of options")
    return d


def parse_scorer_options(text: str | None) -> dict:
    """``--scorer-options '{"kvzip": {"self_window": 1}}'`` (checked by each scorer once it is built)."""
    return parse_json_object(text, "--scorer-options", '{"kvzip": {"self_window": 1}}')


def scorer_options_of(text: str | None, scorer: str) -> dict:
    """The options ``--scorer-options`` (eval's per-scorer form) gives the one scorer of a command, checked by
    building the scorer with them."""
    return checked_scorer_options(parse_scorer_options(text), scorer)


def checked_scorer_options(options: dict, scorer: str) -> dict:
    """The options of ``scorer`` in ``options`` (eval's per-scorer form), checked by building the scorer."""
    from depthkv.scorers import check_scorer_options

    try:
        check_scorer_options(options, [scorer])
    except ValueError as exc:
        raise CliError(f"--scorer-options: {exc}") from None
    return options.get(scorer, {})


def _eval(args: argparse.Namespace) -> int:
    from depthkv.eval.runner import EvalConfig, run_eval

    settings = parse_list(args.settings, "settings")
    if settings == ["both"]:
        settings = ["aware", "agnostic"]
    if args.scorers is None:  # each setting's measured-best scorer (depthkv.allocation.defaults)
        from depthkv.allocation.defaults import press_defaults

        args.scorers = ",".join(dict.fromkeys(press_defaults(s).scorer for s in settings))
    cfg = EvalConfig(
        model=args.model, tasks=parse_list(args.tasks, "tasks"), methods=parse_list(args.methods, "methods"),
        scorers=parse_list(args.scorers, "scorers"), ratios=parse_ratios(args.ratios), samples=args.samples,
        context_tokens=args.context_tokens, settings=settings,
        profile=str(args.profile) if args.profile else None, seed=args.seed, max_new_tokens=args.max_new_tokens,
        protect_first_layer=args.protect_first_layer, n_sink=args.n_sink, n_recent=args.n_recent,
        min_tokens=args.min_tokens, task_options=parse_task_options(args.task_options),
        scorer_options=parse_scorer_options(args.scorer_options), dtype=args.dtype,
        attn=args.attn, force_profile=args.force_profile, decode=args.decode, decode_batch=args.decode_batch,
    )
    cfg.validate()  # before loading the model: bad names and a missing --profile fail at once
    from depthkv.eval import parallel
    from depthkv.eval.results import cleanup_on_error

    shard = parallel.env_shard()  # under torchrun: this process's rank
    if args.devices is not None:
        if shard is not None:
            raise CliError("--devices starts its own worker processes; under torchrun leave it out")
        if args.device != "auto":
            raise CliError("give either --device or --devices, not both")
        devices = parallel.parse_devices(args.devices)
        if len(devices) > 1:
            spec = parallel.ModelSpec(args.model, cfg.dtype, args.attn)
            with cleanup_on_error(args.out):  # an error before the first row leaves no half-made folder
                res = parallel.run_parallel(spec, cfg, args.out, devices, force=args.force,
                                            progress=not args.no_progress)
            return _eval_done(res, res.rows[0]["model"]["name"] if res.rows else args.model)
        args.device = devices[0]
        cfg.dtype = args.dtype = _dtype_name(args.dtype, args.device)
    if shard is not None:
        args.device = parallel.local_device(args.device)
    lm = load(args)
    import contextlib

    # an error before the first row leaves no half-made folder (rank 0 alone prepares it under torchrun)
    with cleanup_on_error(args.out) if shard is None or shard.rank == 0 else contextlib.nullcontext():
        if shard is not None:
            res = parallel.run_distributed(lm, cfg, args.out, shard, force=args.force, progress=not args.no_progress)
            if shard.rank != 0:
                return 0
        else:
            res = run_eval(lm, cfg, args.out, force=args.force, progress=not args.no_progress)
    return _eval_done(res, lm.name)


def _dtype_name(dtype: str, device: str) -> str:
    from depthkv.models.device import dtype_name

    return dtype_name(_dtype(dtype, device))


def _eval_done(res, name: str) -> int:
    """Print the summary table and where the results are."""
    from depthkv.eval.summary import print_summary

    print_summary(res.cells, title=f"{name}: mean [95 % CI]; diff = method - uniform (paired over samples)")
    print(f"{res.new_rows} new rows ({res.skipped} resumed, {res.prefills} prefills) in {res.seconds:.0f} s; "
          f"results: {res.folder / 'results.jsonl'}, summary: {res.folder / 'summary.csv'}")
    return 0


def _report_args(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = (
        f"example:\n  {EXAMPLES['report']}\n\n"
        "Transfer matrix (profile calibrated on family A, evaluated on family B): calibrate one profile per\n"
        "family, evaluate each into its own folder on the same tasks, and report the folders together:\n"
        "  depthkv calibrate --data needle --out needle.json\n"
        "  depthkv calibrate --data code_next_line --out code.json\n"
        "  depthkv eval --profile needle.json --tasks needle,code_next_line --methods uniform,optimal --out runs/needle\n"
        "  depthkv eval --profile code.json --tasks needle,code_next_line --methods uniform,optimal --out runs/code\n"
        "  depthkv report runs/needle runs/code -o report.html\n"
        "One matrix per setting, scorer and ratio; each cell: the method's gain over uniform on that task,\n"
        "paired over the same samples (95 % bootstrap CI)."
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
    p.add_argument("--device", default=d.device, help="auto (CUDA when available, else CPU) | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default=d.dtype, help="auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16 | float16")
    p.add_argument("--out", type=Path, default=Path(d.out))
    p.add_argument("--force", action="store_true", help="recalibrate and re-evaluate from scratch")


@command("demo", _demo_args)
def cmd_demo(args: argparse.Namespace) -> int:
    """The main job end to end: calibrate -> allocate -> eval -> report (SmolLM2, ~10 min on 2 CPUs)."""
    from depthkv.eval.demo import DemoConfig, run_demo
    from depthkv.eval.results import EvalError

    cfg = DemoConfig(model=args.model, samples=args.samples, calib_samples=args.calib_samples,
                     context_tokens=args.context_tokens, calib_context_tokens=args.calib_context_tokens,
                     out=str(args.out), device=args.device, dtype=args.dtype)
    try:
        path = run_demo(cfg, force=args.force)
    except EvalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted; rerun the same command to resume in {args.out}", file=sys.stderr)
        return 130
    return 0 if path.exists() else 1


def _models_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="models_command", required=True, metavar="{add,list}")
    a = sub.add_parser("add", help="convert a local .gguf into the model cache (a built-in alias: sha256-checked)",
                       description="Convert a local .gguf into the depthkv model cache. For a built-in alias the file "
                                   "must match the alias's sha256, and --model ALIAS then loads offline; any other "
                                   "plain name is registered for --model NAME (its sha256 recorded).")
    a.add_argument("name", metavar="ALIAS_OR_NAME", help="a built-in alias (e.g. qwen2.5-coder-1.5b) or a new plain name")
    a.add_argument("--gguf", type=Path, required=True, help="the .gguf file (left untouched)")
    a.add_argument("--force", action="store_true", help="convert again / replace a name that holds another file")
    ls = sub.add_parser("list", help="converted models in the cache: name, size on disk, path, dtype, source sha256")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")


@command("models", _models_args,
         example="depthkv models add qwen2.5-coder-1.5b --gguf qwen2.5-coder-1.5b-instruct.gguf\n"
                 "  depthkv models add my-model --gguf ~/models/my-model.Q8_0.gguf   (then --model my-model)\n"
                 "  depthkv models list")
def cmd_models(args: argparse.Namespace) -> int:
    """The model cache: add a local .gguf (under a built-in alias or a new name), list what is cached."""
    from depthkv.models.manage import add_model, format_listing, list_models

    if args.models_command == "add":
        res = add_model(args.name, args.gguf, force=args.force)
        what = "converted into" if res.converted else "already in"
        print(f"{res.name} ({res.kind}, {res.dtype}): {what} {res.folder}; source sha256 {res.sha256}; "
              f"{res.seconds:.1f} s. Use it with --model {res.name}")
        return 0
    entries = list_models()
    print(json.dumps([e.to_dict() for e in entries], indent=2) if args.json else format_listing(entries))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="depthkv", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (add_args, fn) in COMMANDS.items():
        doc = (fn.__doc__ or "").strip()
        example = EXAMPLES.get(name)
        p = sub.add_parser(name, help=doc.splitlines()[0] if doc else None, description=doc or None,
                           epilog=f"example:\n  {example}" if example else None,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        add_args(p)
        p.set_defaults(func=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    from depthkv.allocation.budgets import BudgetError
    from depthkv.allocation.profile import ProfileError
    from depthkv.allocation.registry import AllocatorError
    from depthkv.calibration.run import CalibrationDataError
    from depthkv.engine.compressed import CompressedContextError
    from depthkv.extras import MissingExtraError
    from depthkv.models.errors import DepthKVModelError
    from depthkv.scorers.question_prior import QuestionQueriesError

    args = build_parser().parse_args(argv)
    try:
        resolve_device_args(args)  # a bad --device/--dtype fails here, before any loading work
        return args.func(args)
    except (BudgetError, AllocatorError, ProfileError, DepthKVModelError, FileNotFoundError,
            NotImplementedError, CompressedContextError, CliError, MissingExtraError, QuestionQueriesError,
            CalibrationDataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # raise SystemExit("error: ...") in a command: bad input, one line, code 2
        if not isinstance(exc.code, str):
            raise
        print(exc.code, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
