"""What a press does when its caller names no scorer, strategy or head split: the settings measured best.

One rule for every front end (``depthkv.press``, ``depthkv generate`` / ``compress``), from the
Qwen2.5-Coder-1.5B runs in README "Which settings to use":

* question inside the prompt (``setting="aware"``, or not said): SnapKV scores, the profile's static ``optimal``
  split (``uniform`` without a profile), one budget per layer;
* context compressed before the question (``setting="agnostic"``): KVzip scores (question-independent), split
  from each input's own scores on top of the profile's floors (``adaptive``; ``global`` without a profile, as
  KVzip's own ranking) and per-KV-head budgets inside each layer (Qwen at 4k tokens: 0.72 / 0.55 of the
  full-cache score at ratio 0.8 / 0.9, a uniform KVzip split 0.31 / 0.08). The floors are the share of the
  static split that ``depthkv refine --floor-shares`` chose for the ratio on the calibration samples, when the
  profile holds one, else half of it. Floors from a refined profile
  (``adaptive-joint``) are not the default: they were not better consistently (Qwen 4k +0.055 at 0.9, Qwen 16k
  +0.013, SmolLM2 1k −0.083 in score) and they tie the split to the ratios a profile was refined at.

A profile that records the scorer it was calibrated with, in the setting asked for, names the scorer instead (a
``kvzip_v`` profile gives ``kvzip_v``: a profile serves only its own scorer, so taking it is what the caller meant).

Input-adaptive splits and head budgets rank the whole context's scores once, after the prefill: a chunked prefill
(``mode="chunked"``) keeps a static split (``optimal-joint`` where refined, else ``optimal``) and one budget per
layer; so does a tensor-parallel model (each rank holds other heads).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from depthkv.allocation.profile import Profile
from depthkv.allocation.sensitivity import refined_entry

AWARE_SCORER = "snapkv"
AGNOSTIC_SCORER = "kvzip"
#: what ``depthkv calibrate`` measures with when no scorer is named: per setting, the scorer and options that kept
#: the most once calibrated with a profile of their own (README "Which settings to use"; Qwen 4k / 8k agnostic:
#: 0.92 / 0.95 at ratio 0.8, 0.82 / 0.88 at 0.9). KVzip's question blend needs question queries, which
#: ``calibrate`` records from its own samples when none are given. A press without a profile keeps
#: ``AGNOSTIC_SCORER``: the blend's directions come from calibration.
CALIBRATION_SCORERS: dict[str, tuple[str, dict[str, Any]]] = {
    "aware": (AWARE_SCORER, {}),
    "agnostic": ("kvzip_vc", {"diversity": 0.5, "question_weight": 0.5}),
}


@dataclass(frozen=True)
class PressDefaults:
    """The scorer, allocator and head split a press takes for what its caller left open."""

    scorer: str
    strategy: str
    head_budgets: bool


def refined_at(profile: Any, ratio: float | None) -> bool:
    """Whether ``profile`` (a ``Profile`` or None) holds a refined split for ``ratio`` (``depthkv refine``)."""
    if profile is None or ratio is None:
        return False
    return refined_entry((getattr(profile, "data", None) or {}).get("refined"), ratio) is not None


def press_defaults(setting: str | None, profile: Any = None, ratio: float | None = None, *, mode: str = "post",
                   split_heads: bool = True) -> PressDefaults:
    """The measured-best choices for ``setting`` ("aware", "agnostic" or None = aware), given the calibration
    ``profile`` (or None), the ``ratio``, the prefill ``mode`` and whether heads may get their own budgets
    (``split_heads=False`` under tensor parallelism)."""
    if setting != "agnostic":
        scorer = profile_scorer(profile, "aware") or AWARE_SCORER
        return PressDefaults(scorer, "optimal" if profile is not None else "uniform", False)
    scorer = profile_scorer(profile, "agnostic") or AGNOSTIC_SCORER
    if mode != "post" or not split_heads:  # one static split, one budget per layer
        static = ("optimal-joint" if refined_at(profile, ratio) else "optimal") if profile is not None else "uniform"
        return PressDefaults(scorer, static, False)
    return PressDefaults(scorer, "adaptive" if profile is not None else "global", True)


def profile_scorer(profile: Any, setting: str) -> str | None:
    """The scorer ``profile`` was calibrated with when it was calibrated in ``setting`` (profiles without a
    recorded setting count as question-aware); None when it records none or ``profile`` is None."""
    if profile is None:
        return None
    view = Profile(getattr(profile, "data", None) or {})  # the profile's own accessors read its document
    return view.scorer_name if view.scorer_name and view.setting == setting else None
