"""Registry of allocators: one name -> one function that splits the global KV budget across layers.

    from depthkv.allocation import allocate
    b = allocate("mga", n_layers=32, context_len=8192, ratio=0.6, sensitivity=view, protected=(0,))

Every allocator receives a validated ``AllocationRequest`` (exact global total, protected and free layers,
token floor) and returns ``Budgets`` whose sum is exactly ``round(L * N * (1 - ratio))``, every entry in
``[min(min_tokens, N), N]``, protected layers at ``N`` -- or raises ``BudgetError`` saying why the
request cannot be met.

What an allocator reads beyond the request is declared when it is registered (``needs``): parts of a
calibration profile's ``SensitivityView`` ("degradation", "metric"), measured once per model, and/or
"scores", the per-layer token scores of the current input (input-adaptive allocation, where budgets
depend on the prompt at hand). ``allocate`` hands each allocator exactly what it declared.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from depthkv.allocation.budgets import BudgetError, Budgets, check_ratio, global_budget
from depthkv.allocation.budgets import uniform as uniform_budgets
from depthkv.allocation.sensitivity import SensitivityError, SensitivityView


class AllocatorError(ValueError):
    """A misconfigured allocation call: unknown allocator or option, missing sensitivity or scores."""


SENSITIVITY_NEEDS = ("degradation", "metric", "refined")  # parts of a SensitivityView (a calibration profile)
INPUT_NEEDS = ("scores",)  # token scores of the current input, one entry per layer


@dataclass(frozen=True)
class AllocationRequest:
    """A validated request: what every allocator starts from.

    ``total`` is the exact global budget; ``free`` are the layers the allocator may prune; ``floor`` is the
    least a pruned layer keeps: ``min(min_tokens, N)`` (a context shorter than the scorer's protected
    window is simply kept whole).
    """

    n_layers: int
    context_len: int
    ratio: float
    total: int
    protected: tuple[int, ...]
    floor: int

    @property
    def free(self) -> tuple[int, ...]:
        prot = set(self.protected)
        return tuple(i for i in range(self.n_layers) if i not in prot)

    @property
    def rest(self) -> int:
        """Tokens left for the free layers once protected layers keep everything."""
        return self.total - len(self.protected) * self.context_len

    def with_protected(self, more: Iterable[int]) -> AllocationRequest:
        prot = tuple(sorted(set(self.protected) | {int(p) for p in more}))
        return AllocationRequest(self.n_layers, self.context_len, self.ratio, self.total, prot, self.floor)

    def check_feasible(self, strategy: str, lo: int | None = None, why: str = "") -> int:
        """Raise unless the free layers can hold ``rest`` tokens with each in [lo, N]; return ``lo``."""
        lo = self.floor if lo is None else int(lo)
        n_free = len(self.free)
        if n_free == 0:
            if self.rest != 0:
                raise BudgetError(
                    f"{strategy}: all {self.n_layers} layers are protected ({list(self.protected)}), so nothing "
                    f"can be pruned, but ratio {self.ratio} asks to remove {-self.rest} of "
                    f"{self.n_layers * self.context_len} KV pairs"
                )
            return lo
        if self.rest < n_free * lo:
            most = n_free * (self.context_len - lo)
            reach = most / (self.n_layers * self.context_len)
            raise BudgetError(
                f"{strategy}: ratio {self.ratio} on a {self.context_len}-token context leaves {self.rest} tokens for "
                f"{n_free} pruned layers, but each must keep at least {lo}{why}; protected layers "
                f"{list(self.protected)} keep all {self.context_len}. The maximum reachable ratio here is "
                f"{reach:.4f}"
            )
        return lo

    def budgets(
        self, free_tokens: Sequence[int] | np.ndarray, strategy: str, protected: Sequence[int] | None = None
    ) -> Budgets:
        """Budgets with ``free_tokens`` on the free layers (in order) and N on the protected ones."""
        tokens = [self.context_len] * self.n_layers
        free = self.free
        if len(free_tokens) != len(free):
            raise BudgetError(f"{strategy}: {len(free_tokens)} budgets for {len(free)} free layers")
        for i, t in zip(free, free_tokens):
            tokens[i] = int(t)
        if sum(tokens) != self.total:  # a bug, never a user error: refuse rather than return a wrong sum
            raise BudgetError(
                f"{strategy}: internal error, budgets sum to {sum(tokens)} instead of {self.total}"
            )
        prot = self.protected if protected is None else tuple(protected)
        return Budgets(tuple(tokens), self.context_len, self.ratio, strategy, prot)


def _as_index(x: Any, what: str) -> int:
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)):
        raise BudgetError(f"{what} must be an integer, got {x!r}")
    return int(x)


def make_request(
    n_layers: int, context_len: int, ratio: float, *, protected: Iterable[int] = (), min_tokens: int = 1
) -> AllocationRequest:
    """Validate the common inputs of every allocator."""
    n_layers = _as_index(n_layers, "n_layers")
    context_len = _as_index(context_len, "context_len")
    min_tokens = _as_index(min_tokens, "min_tokens")
    if n_layers < 1:
        raise BudgetError(f"a model needs at least one layer, got {n_layers}")
    if context_len < 1:
        raise BudgetError(f"context length must be >= 1, got {context_len}")
    if min_tokens < 1:
        raise BudgetError(f"min_tokens must be >= 1 (a layer never keeps zero tokens), got {min_tokens}")
    ratio = check_ratio(ratio)
    if isinstance(protected, (int, np.integer)):
        protected = (protected,)
    prot = sorted({_as_index(p, "a protected layer") for p in protected})
    for p in prot:
        if not 0 <= p < n_layers:
            raise BudgetError(
                f"protected layer {p} does not exist (model has {n_layers} layers, 0..{n_layers - 1})"
            )
    total = global_budget(n_layers, context_len, ratio)
    return AllocationRequest(n_layers, context_len, ratio, total, tuple(prot), min(min_tokens, context_len))


def check_scores(scores: Sequence[Any], n_layers: int, context_len: int, strategy: str) -> None:
    """Raise AllocatorError unless ``scores`` holds one score array per layer over ``context_len`` tokens.

    Each entry is whatever the engine's scorers produce for one layer (a ``[batch, kv_heads, N]`` tensor)
    or any array-like with a ``shape`` whose last axis is the context; allocation only checks the layout.
    """
    try:
        n = len(scores)
    except TypeError:
        raise AllocatorError(
            f"allocator {strategy!r}: scores must be a sequence with one entry per layer, got "
            f"{type(scores).__name__}"
        ) from None
    if n != n_layers:
        raise AllocatorError(f"allocator {strategy!r}: scores cover {n} layers, the request {n_layers}")
    for i, s in enumerate(scores):
        shape = getattr(s, "shape", None)
        if s is None or shape is None or len(shape) < 1:
            raise AllocatorError(f"allocator {strategy!r}: scores of layer {i} are missing or not an array")
        if int(shape[-1]) != context_len:
            raise AllocatorError(
                f"allocator {strategy!r}: scores of layer {i} cover {int(shape[-1])} tokens, the context "
                f"{context_len}"
            )


AllocatorFn = Callable[..., Budgets]


@dataclass(frozen=True)
class AllocatorSpec:
    """A registered allocator: its function, what it reads (``needs``) and its options with defaults."""

    name: str
    fn: AllocatorFn
    needs: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    summary: str = ""

    @property
    def sensitivity_needs(self) -> tuple[str, ...]:
        """Parts of a SensitivityView (a calibration profile) this allocator reads."""
        return tuple(n for n in self.needs if n in SENSITIVITY_NEEDS)

    @property
    def needs_scores(self) -> bool:
        """True for an input-adaptive allocator: it reads the current input's token scores."""
        return "scores" in self.needs

    def __call__(
        self,
        request: AllocationRequest,
        sensitivity: SensitivityView | None = None,
        *,
        scores: Sequence[Any] | None = None,
        **options,
    ) -> Budgets:
        if self.needs_scores:
            return self.fn(request, sensitivity, scores=scores, **options)
        return self.fn(request, sensitivity, **options)


ALLOCATORS: dict[str, AllocatorSpec] = {}


def register_allocator(name: str, *, needs: Sequence[str] = ()) -> Callable[[AllocatorFn], AllocatorFn]:
    """Register ``fn(request, sensitivity, **options) -> Budgets`` under ``name``.

    ``needs``: what the allocator reads besides the request: parts of the SensitivityView ("degradation",
    "metric") and/or "scores", the current input's per-layer token scores, which it then receives as the
    keyword-only argument ``scores`` (``fn(request, sensitivity, *, scores, **options)``). Options are the
    function's other keyword-only parameters; their defaults are recorded in the spec.
    """
    for n in needs:
        if n not in SENSITIVITY_NEEDS + INPUT_NEEDS:
            raise ValueError(f"unknown need {n!r}; known: {', '.join(SENSITIVITY_NEEDS + INPUT_NEEDS)}")

    def deco(fn: AllocatorFn) -> AllocatorFn:
        if name in ALLOCATORS:
            raise ValueError(f"allocator {name!r} is already registered")
        sig = inspect.signature(fn)
        kw_only = [p for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
        if "scores" in needs and not any(p.name == "scores" for p in kw_only):
            raise ValueError(f"allocator {name!r} needs scores: give it a keyword-only parameter 'scores'")
        opts = {p.name: p.default for p in kw_only if not (p.name == "scores" and "scores" in needs)}
        doc = inspect.getdoc(fn) or ""
        ALLOCATORS[name] = AllocatorSpec(name, fn, tuple(needs), opts, doc.splitlines()[0] if doc else "")
        return fn

    return deco


def list_allocators() -> list[str]:
    """Registered allocator names, sorted."""
    return sorted(ALLOCATORS)


def get_allocator(name: str) -> AllocatorSpec:
    try:
        return ALLOCATORS[name]
    except (KeyError, TypeError):
        raise AllocatorError(
            f"unknown allocator {name!r}; available: {', '.join(list_allocators())}"
        ) from None


def check_options(spec: AllocatorSpec, options: Mapping[str, Any]) -> None:
    """Raise AllocatorError naming the allowed options if ``options`` has one ``spec`` does not take."""
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        allowed = ", ".join(f"{k}={v!r}" for k, v in spec.options.items()) or "none"
        raise AllocatorError(
            f"allocator {spec.name!r} has no option {', '.join(unknown)}; its options: {allowed}"
        )


def allocate(
    strategy: str,
    n_layers: int,
    context_len: int,
    ratio: float,
    *,
    sensitivity: SensitivityView | None = None,
    protected: Iterable[int] = (),
    min_tokens: int = 1,
    scores: Sequence[Any] | None = None,
    **options: Any,
) -> Budgets:
    """Tokens kept per layer for ``strategy`` at global pruning ``ratio`` on a ``context_len`` context.

    The sum is exactly ``round(n_layers * context_len * (1 - ratio))``; ``protected`` layers keep all
    ``context_len`` tokens; every other layer keeps at least ``min(min_tokens, context_len)``.
    ``scores`` (the current input's token scores, one ``[..., context_len]`` array per layer) reach only
    allocators registered with ``needs=("scores",)``; the others ignore them.
    Raises AllocatorError for an unknown strategy/option or missing sensitivity/scores, BudgetError for a
    request that cannot be met exactly.
    """
    spec = get_allocator(strategy)
    check_options(spec, options)
    request = make_request(n_layers, context_len, ratio, protected=protected, min_tokens=min_tokens)
    parts = spec.sensitivity_needs
    if parts:
        if sensitivity is None:
            raise AllocatorError(
                f"allocator {strategy!r} needs a sensitivity view with {' and '.join(parts)} "
                f"(from a calibration profile); none was given"
            )
        if not isinstance(sensitivity, SensitivityView):
            raise AllocatorError(f"sensitivity must be a SensitivityView, got {type(sensitivity).__name__}")
    if spec.needs_scores:
        if scores is None:
            raise AllocatorError(
                f"allocator {strategy!r} adapts to the input: it needs the token scores of the current "
                "context (scores=, one array per layer); none were given"
            )
        check_scores(scores, request.n_layers, request.context_len, strategy)
    try:
        if parts:
            sensitivity.check_layers(request.n_layers)
            for need in parts:
                sensitivity.require(need, strategy)
        return spec(request, sensitivity, scores=scores, **options)
    except SensitivityError as exc:  # a view that does not fit this request: a configuration error
        raise AllocatorError(str(exc)) from exc


@register_allocator("uniform")
def _uniform(request: AllocationRequest, sensitivity: SensitivityView | None = None) -> Budgets:
    """Uniform: every unprotected layer pruned to ratio (baseline of the paper, H2O-style).

    Wraps ``budgets.uniform``: the free layers share the rest as evenly as integers allow (the first
    layers get the +1s), which is monotone in the total.
    """
    request.check_feasible("uniform")
    return uniform_budgets(
        request.n_layers,
        request.context_len,
        request.ratio,
        protected=request.protected,
        min_tokens=request.floor,
    )
