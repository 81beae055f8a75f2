"""The one-line switch: ``with depthkv.press(model, scorer="snapkv", ratio=0.6): model.generate(...)``.

``post`` mode (default) prunes every layer right after the prefill of each ``generate`` call (question inside
the prefill: query-aware). ``chunked`` mode runs the prompt through the model C tokens at a time and prunes
after each chunk, so the KV cache never grows far beyond its budget; inside the ``with`` block
``model.generate`` is wrapped to do that transparently. ``compress`` + ``answer`` give the query-agnostic
path: one compressed context, several questions appended after compression.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from depthkv.allocation.budgets import BudgetError, Budgets, check_ratio, uniform
from depthkv.engine.cache import clone_cache, kv_bytes
from depthkv.engine.runner import cache_kwarg, check_input_ids, chunked_prefill, forward_with_cache, new_cache
from depthkv.engine.session import BudgetPolicy, Plan, Protection, Session
from depthkv.engine.static import FastConfig, FastDecodeError, check_greedy, check_model, fast_generate
from depthkv.scorers import Scorer, get_scorer

MODES = ("post", "chunked")


@dataclass
class PressConfig:
    """Everything that decides what a press keeps. Give exactly one of ratio, budgets or policy."""

    scorer: str | Scorer = "snapkv"
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

    def make_policy(self, n_layers: int, protection: Protection) -> BudgetPolicy:
        if self.policy is not None:
            return self.policy
        if self.budgets is not None:
            return self.budgets.for_context
        ratio, prot = self.ratio, tuple(self.protected_layers)
        if self.strategy is not None or self.profile is not None:
            return self._allocator_policy(n_layers, protection)
        return lambda n: uniform(n_layers, n, ratio, protected=prot, min_tokens=min(n, protection.size))


    def _allocator_policy(self, n_layers: int, protection: Protection) -> BudgetPolicy:
        from depthkv.allocation import allocate
        from depthkv.calibration.profile import Profile

        strategy = self.strategy or "optimal"
        prot = tuple(self.protected_layers)
        if self.profile is None:
            allocate(strategy, n_layers, 64 * max(1, protection.size), self.ratio, protected=prot)  # fail early
            return lambda n: allocate(strategy, n_layers, n, self.ratio, protected=prot,
                                      min_tokens=min(n, protection.size))
        profile = self.profile if isinstance(self.profile, Profile) else Profile.load(self.profile)
        if profile.n_layers != n_layers:
            raise BudgetError(f"profile has {profile.n_layers} layers, the model {n_layers}: wrong profile")
        return profile.policy(strategy, self.ratio, protected=prot, min_tokens=protection.size)


@dataclass
class Compressed:
    """A context prefilled and pruned once; ``Press.answer`` appends questions to copies of it."""

    cache: object
    context_ids: torch.Tensor
    logits: torch.Tensor
    budgets: Budgets | None


class Press:
    """Context manager tying a model to one pruning configuration; see the module docstring."""

    def __init__(self, model: nn.Module, config: PressConfig):
        self.model = model
        self.config = config
        self.session = Session(model)
        config.validate(self.session.n_layers)
        if config.profile is not None:
            from depthkv.calibration.profile import Profile
            from depthkv.models.identity import model_identity

            if not isinstance(config.profile, Profile):
                config.profile = Profile.load(config.profile)
            config.profile.check_model(model_identity(model, getattr(model, "name_or_path", "model")))
        self.scorer = get_scorer(config.scorer, **config.scorer_options)
        self.protection = Protection(config.n_sink, config.n_recent)
        self.policy = config.make_policy(self.session.n_layers, self.protection)
        self._orig_generate = None
        self.fast: FastConfig | None = None
        if config.fast:
            check_model(model)  # fail before any work
            self.fast = config.fast if isinstance(config.fast, FastConfig) else FastConfig()

    def _plan(self, kind: str | None = None) -> Plan:
        return Plan(kind=kind or self.config.mode, scorers=[self.scorer], policy=self.policy,
                    protection=self.protection)

    def __enter__(self) -> Press:
        self.session.__enter__()
        self.session.set_plan(self._plan())
        if self.fast is not None:
            self._orig_generate = self.model.generate
            self.model.generate = self._generate_fast
        elif self.config.mode == "chunked":
            self._orig_generate = self.model.generate
            self.model.generate = self._generate_chunked
        return self

    def __exit__(self, *exc) -> None:
        if self._orig_generate is not None:
            del self.model.generate  # drop the instance attribute: the class method shows through again
            self._orig_generate = None
        self.session.__exit__(*exc)

    @property
    def budgets(self) -> Budgets | None:
        """The budget vector used by the last pruning."""
        return self.session.last_budgets

    # ------------------------------------------------------------------ chunked generate
    def _generate_chunked(self, input_ids: torch.Tensor | None = None, **kwargs):
        if input_ids is None:
            input_ids = kwargs.pop("inputs", None)
        key = cache_kwarg(self.model)
        if kwargs.get(key) is not None or input_ids is None or input_ids.shape[1] < 2:
            return self._orig_generate(input_ids=input_ids, **kwargs)
        mask = kwargs.get("attention_mask")
        if mask is not None and not bool(mask.all()):
            raise NotImplementedError("chunked prefill with padded batches is not supported yet")
        cache, _ = chunked_prefill(self.model, self.session, input_ids[:, :-1], self.config.chunk_size)
        kwargs[key] = cache
        self.session.set_plan(self._plan("off"))
        try:
            return self._orig_generate(input_ids=input_ids, **kwargs)
        finally:
            self.session.set_plan(self._plan())

    # ------------------------------------------------------------------ fast (fixed-shape) generate
    def _generate_fast(self, input_ids: torch.Tensor | None = None, **kwargs):
        """``model.generate`` inside a ``fast`` press: same prefill + pruning, then the fixed-shape greedy decoder."""
        if input_ids is None:
            input_ids = kwargs.pop("inputs", None)
        if input_ids is None:
            raise FastDecodeError("the fast decode path needs input_ids")
        if kwargs.pop(cache_kwarg(self.model), None) is not None:
            raise FastDecodeError("inside a fast press, generate builds its own cache: pass none")
        check_input_ids(input_ids)
        check_greedy(self.model, kwargs)
        try:
            if self.config.mode == "chunked":
                if input_ids.shape[1] < 2:
                    raise FastDecodeError("chunked prefill needs a prompt of at least 2 tokens")
                cache, _ = chunked_prefill(self.model, self.session, input_ids[:, :-1], self.config.chunk_size)
                logits = None
            else:  # post: one prefill, every layer pruned right after its attention
                cache = new_cache(self.model)
                logits = forward_with_cache(self.model, input_ids, cache)
            self.session.set_plan(self._plan("off"))
            return fast_generate(self.model, cache, input_ids, logits=logits, config=self.fast, **kwargs)
        finally:
            self.session.set_plan(self._plan())

    # ------------------------------------------------------------------ query-agnostic path
    @torch.no_grad()
    def compress(self, context_ids: torch.Tensor) -> Compressed:
        """Prefill the context alone and prune it (post or chunked, as configured)."""
        check_input_ids(context_ids)
        self.session.set_plan(self._plan())
        if self.config.mode == "chunked":
            cache, logits = chunked_prefill(self.model, self.session, context_ids, self.config.chunk_size)
        else:
            cache = new_cache(self.model)
            logits = forward_with_cache(self.model, context_ids, cache)
        return Compressed(cache, context_ids, logits, self.session.last_budgets)

    @torch.no_grad()
    def answer(self, compressed: Compressed, question_ids: torch.Tensor, **generate_kwargs) -> torch.Tensor:
        """Generate after appending ``question_ids`` to a copy of the compressed context (tokens incl. prompt)."""
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


def press(
    model: nn.Module,
    scorer: str | Scorer = "snapkv",
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
    **scorer_options,
) -> Press:
    """Prune ``model``'s KV cache inside a ``with`` block (see the module docstring).

    ``ratio`` alone prunes every layer alike; with ``strategy`` (an allocator: uniform, pyramid, mlp, mga,
    mlma-k, proportional, optimal) and, where the allocator needs one, a calibration ``profile``, the same
    global budget is split across layers by that allocator (DepthKV). ``fast=True`` (or a ``FastConfig``)
    decodes greedily from the pruned cache with per-layer fixed-size buffers and, on CUDA, one CUDA graph per
    step (``depthkv.engine.static``); it raises where it cannot give the same tokens as plain ``generate``.
    """
    cfg = PressConfig(scorer, ratio, budgets, policy, mode, chunk_size, n_sink, n_recent, tuple(protected_layers),
                      scorer_options, strategy, profile, fast)
    return Press(model, cfg)


def full_kv_bytes(model: nn.Module, context_len: int, batch: int = 1, dtype: torch.dtype | None = None) -> int:
    """Bytes a full cache of ``context_len`` tokens takes for this model (keys + values, every layer)."""
    c = model.config.get_text_config(decoder=True)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kvh = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    elem = torch.finfo(dtype or model.dtype).bits // 8
    return 2 * c.num_hidden_layers * batch * kvh * context_len * head_dim * elem


__all__ = ["Compressed", "Press", "PressConfig", "full_kv_bytes", "kv_bytes", "press"]
