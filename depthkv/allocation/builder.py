"""The one rule "ratio + strategy + profile -> per-layer budgets", used by every front end.

    from depthkv.allocation import BudgetSpec
    spec = BudgetSpec(0.6, "optimal", profile="profile.json", protected=(0,), min_tokens=20)
    spec.validate(n_layers=30)              # misconfigured or unreachable: fails here, before any model work
    b = spec.for_context(30, 4096)          # Budgets for one 4096-token context
    policy = spec.policy(30)                # context_len -> Budgets, what the engine and kvpress consume

``ratio`` is the share of the context's KV pairs removed, averaged over layers (the kept total is exactly
``round(L * N * (1 - ratio))``); ``strategy`` names a registered allocator (``depthkv.allocation.registry``);
``profile`` is a calibration ``Profile`` (or its path, or directly the ``SensitivityView`` allocators read),
needed by the allocators that declare a sensitivity need (``optimal``, ``mga``, ``mlma-k``, ``proportional``).

Budget policies. A ``BudgetPolicy`` is any callable ``policy(context_len) -> Budgets`` (an explicit vector's
``Budgets.for_context`` is one). A policy whose budgets also depend on the input at hand -- an allocator
registered with ``needs=("scores",)`` -- has the attribute ``needs_scores = True`` and is called as
``policy(context_len, scores=scores)`` with the current input's per-layer token scores;
``policy_needs_scores`` tells the two apart. The one-argument form stays the base case, so every existing
policy remains valid, and only a caller that holds every layer's scores before pruning (the engine's session
defers pruning for such a policy; ``score_prefill`` has them all) calls the second form. Budgets of a plain
policy depend on the context length alone and may be cached per length; those of an input-adaptive one may not.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from depthkv.allocation.budgets import BudgetError, Budgets, check_ratio
from depthkv.allocation.profile import Profile
from depthkv.allocation.registry import AllocatorError, allocate, check_options, get_allocator, make_request
from depthkv.allocation.sensitivity import SensitivityError, SensitivityView

BudgetPolicy = Callable[..., Budgets]
"""``policy(context_len) -> Budgets``; with ``needs_scores = True``, ``policy(context_len, scores)``."""

# Context length of the feasibility trial in ``BudgetSpec.validate``: long enough that token floors are a
# negligible share of a layer, so the trial fails only for requests no realistic context can meet (every
# layer protected, a cap such as MGA's ratio_max below the ratio, protected layers holding more than the
# budget); a context too short for the floors is reported by ``for_context`` with the reachable ratio.
TRIAL_CONTEXT = 1 << 20


def policy_needs_scores(policy: BudgetPolicy) -> bool:
    """True when ``policy`` must be called with the current input's token scores."""
    return bool(getattr(policy, "needs_scores", False))


@dataclass(frozen=True)
class BudgetSpec:
    """What decides a budget vector, independent of the context length: ratio, allocator, profile, floors.

    ``protected``: layers kept whole (the paper keeps layer 0); ``min_tokens``: the least a pruned layer
    keeps (the scorer's protected window: sinks + recent), capped at the context length; ``options``:
    the allocator's own options (e.g. ``{"beta": 20.0}`` for ``pyramid``).
    """

    ratio: float
    strategy: str = "uniform"
    profile: Profile | SensitivityView | str | Path | None = None
    protected: tuple[int, ...] = ()
    min_tokens: int = 1
    options: Mapping[str, Any] = field(default_factory=dict)
    _view: SensitivityView | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        prot = self.protected
        object.__setattr__(self, "protected", (prot,) if isinstance(prot, int) else tuple(prot))
        object.__setattr__(self, "options", dict(self.options))
        prof = self.profile
        if isinstance(prof, (str, Path)):
            prof = Profile.load(prof)
            object.__setattr__(self, "profile", prof)
        if isinstance(prof, Profile):
            object.__setattr__(self, "_view", prof.view())
        elif isinstance(prof, SensitivityView):
            object.__setattr__(self, "_view", prof)
        elif prof is not None:
            raise AllocatorError(
                f"profile must be a Profile, a path to one or a SensitivityView, got {type(prof).__name__}"
            )

    # ------------------------------------------------------------------ what the spec reads
    @property
    def view(self) -> SensitivityView | None:
        """The sensitivity the allocator reads (from the profile), or None without a profile."""
        return self._view

    @property
    def needs_scores(self) -> bool:
        """True when the allocator adapts to the input and needs its per-layer token scores."""
        return get_allocator(self.strategy).needs_scores

    @property
    def profile_layers(self) -> int | None:
        """Layer count of the profile, or None without one."""
        return None if self._view is None else self._view.n_layers

    def _check_profile(self, n_layers: int) -> None:
        spec = get_allocator(self.strategy)
        parts = spec.sensitivity_needs
        if self._view is None:
            if parts:
                raise AllocatorError(
                    f"allocator {self.strategy!r} reads a calibration profile ({' and '.join(parts)}); give "
                    "profile= (from depthkv calibrate)"
                )
            return
        if self._view.n_layers != n_layers:
            raise AllocatorError(
                f"the profile was measured on {self._view.n_layers} layers but the model has {n_layers}: "
                "use a profile calibrated on this model"
            )
        try:
            for part in parts:
                self._view.require(part, self.strategy)
        except SensitivityError as exc:
            raise AllocatorError(str(exc)) from None

    # ------------------------------------------------------------------ checks and budgets
    def validate(self, n_layers: int) -> None:
        """Fail now on a request that is misconfigured or that no realistic context length can meet.

        Raises BudgetError for a ratio outside [0, 1), bad layer indices or floors, and an unreachable
        target; AllocatorError for an unknown strategy or option, a missing profile, a profile of another
        layer count or one lacking what the allocator reads.
        """
        check_ratio(self.ratio)
        spec = get_allocator(self.strategy)
        check_options(spec, self.options)
        make_request(n_layers, 1, self.ratio, protected=self.protected, min_tokens=self.min_tokens)
        self._check_profile(n_layers)
        if spec.needs_scores:  # its budgets depend on an input; nothing to try without one
            return
        n = max(TRIAL_CONTEXT, 1000 * int(self.min_tokens))
        try:
            self.for_context(n_layers, n)
        except BudgetError as exc:
            raise BudgetError(f"{self.strategy} cannot meet ratio {self.ratio} on {n_layers} layers even for a "
                              f"{n}-token context: {exc}") from None

    def for_context(self, n_layers: int, context_len: int, scores: Sequence[Any] | None = None) -> Budgets:
        """Budgets of ``n_layers`` layers for a ``context_len``-token context; sum exactly ``round(L*N*(1-ratio))``.

        ``scores`` (the current input's token scores, one ``[..., context_len]`` array per layer) are
        forwarded only to an allocator registered with ``needs=("scores",)``; others ignore them.
        """
        self._check_profile(n_layers)
        return allocate(self.strategy, n_layers, context_len, self.ratio, sensitivity=self._view,
                        protected=self.protected, min_tokens=self.min_tokens, scores=scores, **self.options)

    def policy(self, n_layers: int | None = None) -> SpecPolicy:
        """This spec as a validated budget policy for a model of ``n_layers`` layers (default: the profile's)."""
        if n_layers is None:
            n_layers = self.profile_layers
            if n_layers is None:
                raise AllocatorError("give n_layers= (or a profile=) to split a ratio across layers")
        self.validate(n_layers)
        return SpecPolicy(self, int(n_layers))


@dataclass(frozen=True)
class SpecPolicy:
    """A ``BudgetSpec`` bound to one model depth: ``policy(context_len[, scores]) -> Budgets``."""

    spec: BudgetSpec
    n_layers: int

    @property
    def needs_scores(self) -> bool:
        return self.spec.needs_scores

    def __call__(self, context_len: int, scores: Sequence[Any] | None = None) -> Budgets:
        return self.spec.for_context(self.n_layers, context_len, scores)

