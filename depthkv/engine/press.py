"""The one-line switch: ``with depthkv.press(model, scorer="snapkv", ratio=0.6): model.generate(...)``.

``post`` mode (default) prunes every layer right after the prefill of each ``generate`` call (question inside
the prefill: query-aware). ``chunked`` mode runs the prompt through the model C tokens at a time and prunes
after each chunk, so the KV cache never grows far beyond its budget; inside the ``with`` block
``model.generate`` is wrapped to do that transparently. ``compress`` + ``answer`` give the query-agnostic
path: one compressed context, several questions appended after compression. Outside a ``with`` block,
``compress`` and ``answer`` enter the press for the call and leave the model as they found it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from depthkv.allocation.budgets import BudgetError, Budgets, check_ratio
from depthkv.allocation.builder import BudgetPolicy, BudgetSpec
from depthkv.allocation.defaults import press_defaults
from depthkv.engine.cache import clone_cache, kv_bytes
from depthkv.engine.compressed import CompressedContext, CompressionSettings, profile_sha256
from depthkv.engine.reconstruct import ContextPassStats, reconstruct_scores
from depthkv.engine.runner import (
    cache_kwarg,
    check_input_ids,
    chunked_prefill,
    forward_with_cache,
    new_cache,
    padded_inputs,
)
from depthkv.engine.session import Plan, Protection, Session
from depthkv.engine.static import FastConfig, FastDecodeError, check_greedy, check_model, fast_generate
from depthkv.engine.tensor_parallel import check_supported as check_tensor_parallel
from depthkv.scorers import Scorer, get_scorer

MODES = ("post", "chunked")


def chunked_conflict(scorer: Scorer | None, head_budgets: bool | None) -> str | None:
    """Why pruning chunk by chunk (``mode="chunked"``) cannot serve these choices, or None when it can. Per-head
    budgets are split over the whole context's scores, and a ``whole_context`` scorer (e.g. a KVzip variant that
    re-orders each head by value norms or a cross-layer consensus) finishes its scores only once every chunk is
    replayed; chunk by chunk, neither exists when a chunk must be pruned. The one home of this rule: the press and
    the CLI (which refuses before the model loads) both word their refusal around it."""
    if head_budgets:
        return "per-head budgets are split once, over the whole context's scores"
    if scorer is not None and scorer.whole_context:
        return f"scorer {scorer.name!r} orders the whole context's scores once it is replayed"
    return None


@dataclass
class PressConfig:
    """Everything that decides what a press keeps. Give exactly one of ratio, budgets or policy."""

    scorer: str | Scorer | None = None  # None: the setting's default (SnapKV; KVzip for "agnostic")
    ratio: float | None = None
    budgets: Budgets | None = None
    policy: BudgetPolicy | None = None
    mode: str = "post"
    chunk_size: int = 1024
    n_sink: int = 4
    n_recent: int = 16
    protected_layers: Sequence[int] = ()
    scorer_options: dict = field(default_factory=dict)
    strategy: str | None = None  # an allocator name (depthkv.allocation); with ratio=, splits it across layers
    profile: object | None = None  # a calibration Profile (or its path) for allocators that need one
    fast: bool | FastConfig = False  # greedy decoding with fixed-shape per-layer buffers (CUDA graph on GPU)
    # split each layer's budget across its KV heads by their scores (AdaKV-style); None: the setting's default
    head_budgets: bool | None = None
    tokenizer: object | None = None  # the model's tokenizer, for scorers that build prompts (KVzip)
    # how the press will be used, checked against the profile's calibration at construction: "aware"
    # (generate with the question in the prompt), "agnostic" (compress, then answer); None: checked at each use
    setting: str | None = None
    force_profile: bool = False  # use a profile calibrated with another scorer or setting anyway

    def validate(self, n_layers: int) -> None:
        given = [x is not None for x in (self.ratio, self.budgets, self.policy)]
        if sum(given) != 1:
            raise ValueError("give exactly one of ratio=, budgets= or policy=")
        if self.ratio is not None:
            self.ratio = check_ratio(self.ratio)
        if (self.strategy is not None or self.profile is not None) and self.ratio is None:
            raise ValueError("strategy= and profile= split a ratio= across layers: give ratio= too")
        if self.budgets is not None:
            self.budgets.check_length(n_layers)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk size must be >= 1, got {self.chunk_size}")
        for p in self.protected_layers:
            if not 0 <= p < n_layers:
                raise BudgetError(f"protected layer {p} does not exist (model has {n_layers} layers)")
        if self.mode == "chunked" and (why := chunked_conflict(None, self.head_budgets)):
            raise ValueError(f"mode='chunked' prunes chunk by chunk, but {why}: use mode='post'")
        if self.setting not in (None, "aware", "agnostic"):
            raise ValueError(f"setting must be 'aware', 'agnostic' or None, got {self.setting!r}")

    def make_policy(self, n_layers: int, protection: Protection) -> BudgetPolicy:
        """The given policy, the explicit vector's, or ``budget_spec``'s policy for this model's layers."""
        if self.policy is not None:
            return self.policy
        if self.budgets is not None:
            return self.budgets.for_context
        return self.budget_spec(protection).policy(n_layers)

    def fill_defaults(self, split_heads: bool = True) -> None:
        """Set what the caller left open (scorer, strategy, head split: None) to the setting's measured-best
        choices (``depthkv.allocation.defaults``); call once the profile is loaded."""
        d = press_defaults(self.setting, self.profile, self.ratio, mode=self.mode, split_heads=split_heads)
        if self.scorer is None:
            self.scorer = d.scorer
        if self.head_budgets is None:
            self.head_budgets = d.head_budgets
        if self.strategy is None and self.ratio is not None:
            self.strategy = d.strategy

    def budget_spec(self, protection: Protection) -> BudgetSpec:
        """ratio + strategy + profile as a ``BudgetSpec`` (strategy None: the setting's default); every pruned
        layer keeps at least the protected window (sinks + recent tokens)."""
        strategy = self.strategy or press_defaults(self.setting, self.profile, self.ratio, mode=self.mode).strategy
        return BudgetSpec(self.ratio, strategy, self.profile, tuple(self.protected_layers), max(1, protection.size))


Compressed = CompressedContext  # the earlier name, kept for existing code


class Press:
    """Context manager tying a model to one pruning configuration; see the module docstring."""

    def __init__(self, model: nn.Module, config: PressConfig):
        self.model = model
        self.config = config
        self.session = Session(model)
        config.validate(self.session.n_layers)
        check_tensor_parallel(self.session.tp_group, head_budgets=config.head_budgets, fast=bool(config.fast))
        if config.profile is not None:
            from depthkv.allocation.profile import Profile
            from depthkv.models.identity import model_identity

            if not isinstance(config.profile, Profile):
                config.profile = Profile.load(config.profile)
            config.profile.check_model(model_identity(model, getattr(model, "name_or_path", "model")))
        config.fill_defaults(split_heads=self.session.tp_group is None)
        if config.profile is not None and isinstance(config.scorer, str):  # the profile's scorer options too
            config.scorer_options = config.profile.options_for(config.scorer, config.scorer_options,
                                                               force=config.force_profile)
        self.scorer = bind_scorer(get_scorer(config.scorer, **config.scorer_options), model, config.tokenizer)
        if config.setting is not None:
            self._check_profile(config.setting)
        if config.mode == "chunked" and (why := chunked_conflict(self.scorer, config.head_budgets)):
            raise ValueError(f"mode='chunked' prunes chunk by chunk, but {why}: use mode='post'")
        self.protection = Protection(config.n_sink, config.n_recent)
        self.policy = config.make_policy(self.session.n_layers, self.protection)
        if getattr(self.policy, "needs_scores", False) and config.mode == "chunked":
            raise ValueError(f"allocator {config.strategy!r} ranks the whole context's scores: use mode='post'")
        self._orig_generate = None
        self.last_context_pass: ContextPassStats | None = None  # KVzip-style scorers: cost of the last replay
        self._active = False  # inside a with block (hooks attached)
        self.fast: FastConfig | None = None
        if config.fast:
            check_model(model)  # fail before any work
            self.fast = config.fast if isinstance(config.fast, FastConfig) else FastConfig()

    def _check_profile(self, setting: str) -> None:
        """Refuse, before any pruning, a profile calibrated with another scorer or in another setting."""
        if self.config.profile is not None:
            self.config.profile.check_use(self.scorer.name, setting, force=self.config.force_profile)

    def _plan(self, kind: str | None = None) -> Plan:
        defer = self.config.head_budgets or bool(getattr(self.policy, "needs_scores", False))
        return Plan(kind=kind or self.config.mode, scorers=[self.scorer], policy=self.policy,
                    protection=self.protection, defer=defer, head_budgets=self.config.head_budgets)

    @torch.no_grad()
    def _prefill(self, ids: torch.Tensor) -> tuple[object, torch.Tensor]:
        """Prefill ``ids`` into a new cache and prune it as configured: (pruned cache, last logits).

        post: pruned during the forward (right after each layer's attention, or all layers after the last one
        when budgets depend on the scores); chunked: after every chunk; a context-pass scorer (KVzip) prefills
        first, replays the context to score it, then prunes (per chunk in chunked mode).
        """
        if not self.scorer.context_pass:
            self.session.set_plan(self._plan())
            if self.config.mode == "chunked":
                return chunked_prefill(self.model, self.session, ids, self.config.chunk_size)
            cache = new_cache(self.model)
            return cache, forward_with_cache(self.model, ids, cache)
        self.protection.check_context(ids.shape[1])
        self.session.set_plan(self._plan("off"))
        cache = new_cache(self.model)
        size = self.config.chunk_size if self.config.mode == "chunked" else ids.shape[1]
        logits = None
        self.last_context_pass = ContextPassStats()  # what the replay cost, over all chunks
        for start in range(0, ids.shape[1], size):
            chunk = ids[:, start:start + size]
            logits = forward_with_cache(self.model, chunk, cache)
            self.last_context_pass += reconstruct_scores(self.model, self.session, cache, chunk, [self.scorer])
            scores = self.session.scores
            self.session.plan = self._plan()  # keeps the scores (set_plan would drop them)
            self.session.prune_all(cache, self.scorer.name, ids.shape[1], keep_scores=True)
            self.session.scores = scores
            self.session.plan = self._plan("off")
        self.session.set_plan(self._plan())
        return cache, logits

    def __enter__(self) -> Press:
        if self._active:
            raise RuntimeError("this press is already entered")
        self.session.__enter__()
        self._active = True
        self.session.set_plan(self._plan())
        if self.fast is not None:
            self._orig_generate = self.model.generate
            self.model.generate = self._generate_fast
        elif self.config.mode == "chunked" or self.scorer.context_pass:
            self._orig_generate = self.model.generate
            self.model.generate = self._generate_prefilled
        elif self.config.profile is not None:  # post mode prunes inside generate: check the profile first
            self._orig_generate = self.model.generate
            self.model.generate = self._generate_checked
        return self

    def __exit__(self, *exc) -> None:
        if self._orig_generate is not None:
            del self.model.generate  # drop the instance attribute: the class method shows through again
            self._orig_generate = None
        self.session.__exit__(*exc)
        self._active = False

    def _scope(self) -> contextlib.AbstractContextManager:
        """A no-op inside a ``with`` block; outside it, the press itself (entered for one call, then left)."""
        return contextlib.nullcontext() if self._active else self

    @property
    def budgets(self) -> Budgets | None:
        """The budget vector used by the last pruning (of a batch's last sequence: see ``sequence_budgets``)."""
        return self.session.last_budgets

    @property
    def sequence_budgets(self) -> list[Budgets] | None:
        """One budget vector per sequence of the last pruned batch, each from that sequence's own length."""
        return self.session.last_sequence_budgets

    def _generate_checked(self, *args, **kwargs):
        """``model.generate`` (post mode, pruned by the session's hooks) after the profile check."""
        self._check_profile("aware")
        return self._orig_generate(*args, **kwargs)

    # ------------------------------------------------------------------ generate after our own prefill
    def _generate_prefilled(self, input_ids: torch.Tensor | None = None, **kwargs):
        """``model.generate`` whose prompt (all but its last token) is prefilled and pruned by ``_prefill``
        first: chunked prefill, and scorers that need a context pass before pruning."""
        self._check_profile("aware")
        if input_ids is None:
            input_ids = kwargs.pop("inputs", None)
        key = cache_kwarg(self.model)
        if kwargs.get(key) is not None or input_ids is None or input_ids.shape[1] < 2:
            return self._orig_generate(input_ids=input_ids, **kwargs)
        mask = kwargs.get("attention_mask")
        if mask is not None and not bool(mask.all()):
            raise NotImplementedError("prefilling with padded batches is not supported yet (chunked mode, KVzip)")
        cache, _ = self._prefill(input_ids[:, :-1])
        kwargs[key] = cache
        self.session.set_plan(self._plan("off"))
        try:
            return self._orig_generate(input_ids=input_ids, **kwargs)
        finally:
            self.session.set_plan(self._plan())

    # ------------------------------------------------------------------ fast (fixed-shape) generate
    def _generate_fast(self, input_ids: torch.Tensor | None = None, **kwargs):
        """``model.generate`` inside a ``fast`` press: same prefill + pruning, then the fixed-shape greedy decoder."""
        self._check_profile("aware")
        if input_ids is None:
            input_ids = kwargs.pop("inputs", None)
        if input_ids is None:
            raise FastDecodeError("the fast decode path needs input_ids")
        if kwargs.pop(cache_kwarg(self.model), None) is not None:
            raise FastDecodeError("inside a fast press, generate builds its own cache: pass none")
        check_input_ids(input_ids)
        check_greedy(self.model, kwargs)
        padded = padded_inputs(kwargs.get("attention_mask"), input_ids)
        try:
            if self.config.mode == "chunked" or self.scorer.context_pass:
                if padded:
                    raise NotImplementedError("prefilling with padded batches is not supported yet (chunked mode, "
                                              "KVzip)")
                if input_ids.shape[1] < 2:
                    raise FastDecodeError("this prefill needs a prompt of at least 2 tokens")
                cache, _ = self._prefill(input_ids[:, :-1])
                logits = None
            else:  # post: one prefill, every layer pruned right after its attention
                cache = new_cache(self.model)
                logits = forward_with_cache(self.model, input_ids, cache, **padded)
            self.session.set_plan(self._plan("off"))
            return fast_generate(self.model, cache, input_ids, logits=logits, config=self.fast, **kwargs)
        finally:
            self.session.set_plan(self._plan())

    # ------------------------------------------------------------------ query-agnostic path
    @torch.no_grad()
    def compress(self, context_ids: torch.Tensor) -> CompressedContext:
        """Prefill the context alone and prune it (post or chunked, as configured); works inside or outside
        a ``with`` block."""
        check_input_ids(context_ids)
        self._check_profile("agnostic")
        with self._scope():
            cache, logits = self._prefill(context_ids)
            return self._compressed(cache, context_ids, logits)

    def _compressed(self, cache, context_ids: torch.Tensor, logits: torch.Tensor) -> CompressedContext:
        """Wrap a pruned cache with what made it (model identity, settings, budgets), for answer() and save()."""
        from depthkv.models.identity import model_identity

        c = self.config
        budgets = self.session.last_budgets
        settings = CompressionSettings(
            scorer=self.scorer.name, ratio=c.ratio if c.ratio is not None else getattr(budgets, "ratio", None),
            strategy=c.strategy or getattr(budgets, "strategy", None), profile_sha256=profile_sha256(c.profile),
            n_sink=self.protection.n_sink, n_recent=self.protection.n_recent,
            protected_layers=tuple(int(x) for x in c.protected_layers), mode=c.mode,
            chunk_size=c.chunk_size if c.mode == "chunked" else None, head_budgets=bool(c.head_budgets),
            scorer_config=repr(self.scorer))
        identity = model_identity(self.model, getattr(self.model, "name_or_path", None) or type(self.model).__name__)
        return CompressedContext(cache, context_ids, logits, budgets, identity, settings)

    @torch.no_grad()
    def answer(self, compressed: CompressedContext, question_ids: torch.Tensor, **generate_kwargs) -> torch.Tensor:
        """Generate after appending ``question_ids`` to a copy of the compressed context (tokens incl. prompt);
        the context may come from ``compress`` or ``CompressedContext.load``."""
        if len(compressed.cache.layers) != self.session.n_layers:
            raise ValueError(f"the compressed context has {len(compressed.cache.layers)} layers, the model "
                             f"{self.session.n_layers}: it was compressed by another model")
        with self._scope():
            return self._answer(compressed, question_ids, **generate_kwargs)

    def _answer(self, compressed: CompressedContext, question_ids: torch.Tensor, **generate_kwargs) -> torch.Tensor:
        self.session.set_plan(self._plan("off"))
        try:
            ids = torch.cat([compressed.context_ids, question_ids.to(compressed.context_ids.device)], dim=1)
            if self.fast is not None:
                return fast_generate(self.model, clone_cache(compressed.cache), ids, config=self.fast,
                                     **generate_kwargs)
            gen = self._orig_generate or self.model.generate
            kwargs = {cache_kwarg(self.model): clone_cache(compressed.cache), **generate_kwargs}
            return gen(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        finally:
            self.session.set_plan(self._plan())


def bind_scorer(scorer: Scorer, model: nn.Module, tokenizer=None) -> Scorer:
    """``scorer`` completed with the model's tokenizer where it needs one (KVzip's repeat prompt), after checking
    that data the scorer carries (KVzip's question queries) was made for ``model``.

    Without ``tokenizer`` the one saved next to the model's weights is tried (no download); a scorer that
    still lacks its prompt then fails with a clear error when it is first used.
    """
    from depthkv.models.identity import model_identity

    scorer.check_model(model_identity(model, getattr(model, "name_or_path", None) or "this model"))
    if not scorer.context_pass or getattr(scorer, "ready", True):
        return scorer
    if tokenizer is None:
        path = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
        if path:
            try:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            except (OSError, ValueError):
                tokenizer = None
    return scorer.bind(tokenizer) if tokenizer is not None else scorer


def press(
    model: nn.Module,
    scorer: str | Scorer | None = None,
    ratio: float | None = None,
    *,
    budgets: Budgets | None = None,
    policy: BudgetPolicy | None = None,
    mode: str = "post",
    chunk_size: int = 1024,
    n_sink: int = 4,
    n_recent: int = 16,
    protected_layers: Sequence[int] = (),
    strategy: str | None = None,
    profile: object | None = None,
    fast: bool | FastConfig = False,
    head_budgets: bool | None = None,
    tokenizer: object | None = None,
    setting: str | None = None,
    force_profile: bool = False,
    **scorer_options,
) -> Press:
    """Prune ``model``'s KV cache inside a ``with`` block (see the module docstring).

    ``ratio`` alone prunes every layer alike; with ``strategy`` (an allocator: uniform, pyramid, mlp, mga,
    mlma-k, proportional, optimal) and, where the allocator needs one, a calibration ``profile``, the same
    global budget is split across layers by that allocator (DepthKV). ``fast=True`` (or a ``FastConfig``)
    decodes greedily from the pruned cache with per-layer fixed-size buffers and, on CUDA, one CUDA graph per
    step (``depthkv.engine.static``); it raises where it cannot give the same tokens as plain ``generate``.

    Question-independent scorers (``kvzip``, ``expected_attention``) suit contexts compressed before the
    question is known (``compress``/``answer``); ``kvzip`` replays the context once more to score it and needs
    the model's ``tokenizer`` for its repeat prompt (found next to the weights when not given). Input-adaptive
    allocators (``global``, ``adaptive``) split the budget from each input's own scores; ``head_budgets=True``
    also splits each layer's budget across its KV heads. The global budget stays exact in every case.

    What is left open follows ``setting`` (``depthkv.allocation.defaults``): by default SnapKV with the
    profile's ``optimal`` split (``uniform`` without one); with ``setting="agnostic"`` KVzip, the input-adaptive
    split on the profile's floors (``adaptive``; ``global`` without a profile) and per-head budgets, the best
    measured when the question comes after the compression.

    A ``profile`` is used only as it was calibrated (its scorer; "aware" for ``generate`` inside the block,
    "agnostic" for ``compress``): a mismatch raises ``ProfileError`` before any pruning, at construction
    when ``setting`` is given, else at that use; ``force_profile=True`` uses it anyway.
    """
    cfg = PressConfig(scorer, ratio, budgets, policy, mode, chunk_size, n_sink, n_recent, tuple(protected_layers),
                      scorer_options, strategy, profile, fast, head_budgets, tokenizer, setting=setting,
                      force_profile=force_profile)
    return Press(model, cfg)


def full_kv_bytes(model: nn.Module, context_len: int, batch: int = 1, dtype: torch.dtype | None = None) -> int:
    """Bytes a full cache of ``context_len`` tokens takes for this model (keys + values, every layer)."""
    c = model.config.get_text_config(decoder=True)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kvh = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    elem = torch.finfo(dtype or model.dtype).bits // 8
    return 2 * c.num_hidden_layers * batch * kvh * context_len * head_dim * elem


__all__ = ["Compressed", "CompressedContext", "Press", "PressConfig", "full_kv_bytes", "kv_bytes", "press"]
