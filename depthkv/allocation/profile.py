"""The sensitivity profile: a versioned JSON file bound to one model (no pickle anywhere).

Written by ``depthkv calibrate`` (``depthkv.calibration``), read by the allocators through ``Profile.view()``
and by ``BudgetSpec`` (``depthkv.allocation.builder``); it lives beside allocation because it is the
allocators' input, and it imports nothing above ``depthkv.allocation``.

Schema (``schema_version`` 1), top-level keys:
  schema_version, kind="depthkv-profile", created (ISO time), package_version, seed
  model: {name, model_type, n_layers, n_heads, n_kv_heads, head_dim, config_sha256}
  scorer: {name, options}; protection: {n_sink, n_recent}. Options that name a file (``FILE_OPTIONS``: KVzip's
    question queries) are written relative to the profile's folder and read back as absolute paths, so a
    profile and its files move together.
  setting: "aware" (question inside the pruned prefill) | "agnostic" (context pruned before the question is
    known); files written before this field existed read as "aware". ``check_use`` refuses a profile used
    with another scorer or setting than it was calibrated in.
  probe_ratios: [r...] (1.0 = only the protected window kept)
  curves: {"kl"|"nll": {"mean": [L][R], "lo": [L][R], "hi": [L][R]}}   95 % percentile bootstrap CIs
  samples: {"kl"|"nll": [S][L][R]} raw per-sample degradations (small; kept so that statistics can be redone)
  full_nll: [S]; context_lens: [S]
  permutation: {"kl"|"nll": {str(ratio): {statistic, p_value, effect_size, n_perm, null_mean, null_std}}}
  proxy: ProxyResult.to_dict() or null; spearman: [{metric, stage, rho, p}] or null; best_proxy: {...} or null
  data: {description, sha256 (of the calibration token ids), n_samples, tasks}
  timings: {prefill_and_ablation_s, proxy_s, total_s, refine_s (when refined), floor_shares_s (when tuned)}
  refined (optional, ``depthkv refine``): {str(ratio): {shares: [L] kept share of the context per layer,
    start: "optimal", joint_kl_start, joint_kl_refined, rounds, samples, seconds, ...}}
  floor_shares (optional, ``depthkv refine --floor-shares``): {"adaptive"|"adaptive-joint": {str(ratio): {share:
    the floor share chosen, kl: {str(share): mean joint KL}, heads, samples}}}, read by that allocator
A profile made for another model (different config hash or layer count) is refused with an error.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from depthkv.allocation.sensitivity import SensitivityView
from depthkv.io import write_json

SCHEMA_VERSION = 1
KIND = "depthkv-profile"
SETTINGS = ("aware", "agnostic")
#: scorer options whose value is a file path (see the schema note above)
FILE_OPTIONS = ("question_queries",)


class ProfileError(ValueError):
    """A profile file that is malformed, from a newer schema, or made for another model."""


@dataclass
class Profile:
    """A loaded profile: ``data`` is the JSON document above; the accessors read the parts allocators use."""

    data: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ accessors
    @property
    def n_layers(self) -> int:
        return int(self.data["model"]["n_layers"])

    @property
    def setting(self) -> str:
        """Where the question was during calibration: "aware" (in the pruned prefill) or "agnostic" (after it)."""
        return str(self.data.get("setting") or "aware")

    @property
    def scorer_name(self) -> str | None:
        """The token scorer the probes pruned with (None in hand-made files that do not record one)."""
        return (self.data.get("scorer") or {}).get("name")

    @property
    def scorer_options(self) -> dict[str, Any]:
        """The options the scorer was built with at calibration (e.g. ``{"value_weight": 1.0}``; {} if none)."""
        return dict((self.data.get("scorer") or {}).get("options") or {})

    def options_for(self, scorer_name: str, given: dict[str, Any], force: bool = False) -> dict[str, Any]:
        """The options a scorer named ``scorer_name`` should be built with under this profile: ``given`` plus the
        profile's own options for that scorer where ``given`` leaves them out (a profile serves the scorer it was
        measured with, options included). A key given with another value than the profile's raises
        ``ProfileError``; with ``force`` (or for another scorer) ``given`` is returned as it is."""
        if force or scorer_name != self.scorer_name:
            return dict(given)
        mine = self.scorer_options
        given = _with_paths(given, lambda p: str(Path(p).resolve()))
        clash = {k: (mine[k], v) for k, v in given.items() if k in mine and mine[k] != v}
        if clash:
            said = ", ".join(f"{k}={theirs!r} (profile: {ours!r})" for k, (ours, theirs) in clash.items())
            raise ProfileError(
                f"the profile was calibrated with scorer {scorer_name!r} built with other options: {said}; "
                "calibrate one with those options (depthkv calibrate --scorer-options), or force its use "
                "(--force-profile, force_profile=True)"
            )
        return {**mine, **given}

    @property
    def probe_ratios(self) -> tuple[float, ...]:
        return tuple(self.data["probe_ratios"])

    def curve(self, metric: str = "kl") -> np.ndarray:
        """Mean degradation [L, R] of a single-layer ablation."""
        return np.asarray(self.data["curves"][metric]["mean"], dtype=float)

    def sensitivity(self, metric: str = "kl") -> np.ndarray:
        """One number per layer: the mean degradation over the probe ratios (area under the curve)."""
        return self.curve(metric).mean(axis=1)

    def view(self, metric: str = "kl") -> SensitivityView:
        """What allocators read: curves (clipped at 0: negative values are noise) and InfoNCE if measured."""
        infonce = None
        proxy = self.data.get("proxy")
        if proxy and self.data.get("infonce_per_layer") is not None:
            infonce = np.asarray(self.data["infonce_per_layer"], dtype=float)
        refined = {float(r): entry["shares"] for r, entry in (self.data.get("refined") or {}).items()}
        return SensitivityView(self.probe_ratios, np.clip(self.curve(metric), 0.0, None), infonce,
                               refined=refined or None, floor_shares=self.data.get("floor_shares") or None)

    # ------------------------------------------------------------------ binding
    def check_model(self, identity: dict[str, Any]) -> None:
        """Raise unless this profile was made for the model described by ``identity``."""
        mine = self.data["model"]
        for key in ("n_layers", "config_sha256"):
            if mine.get(key) != identity.get(key):
                raise ProfileError(
                    f"profile was made for {mine.get('name')!r} ({mine.get('n_layers')} layers, config "
                    f"{str(mine.get('config_sha256'))[:12]}), not for {identity.get('name')!r} "
                    f"({identity.get('n_layers')} layers, config {str(identity.get('config_sha256'))[:12]}); "
                    "calibrate this model first (depthkv calibrate)"
                )

    def check_use(self, scorer_name: str | None, setting: str | None, force: bool = False) -> None:
        """Raise unless this profile was calibrated with ``scorer_name`` in ``setting`` (None: not checked).

        Sensitivity depends on which tokens the scorer keeps and on whether the question was in the pruned
        prefill, so a profile only ranks layers correctly where it is used as it was measured. ``force``
        skips the check (deliberate transfer experiments).
        """
        if setting is not None and setting not in SETTINGS:
            raise ProfileError(f"unknown setting {setting!r}; choose one of: {', '.join(SETTINGS)}")
        if force:
            return
        mine = self.scorer_name
        scorer_ok = scorer_name is None or mine is None or scorer_name == mine
        if scorer_ok and (setting is None or setting == self.setting):
            return
        want_scorer = scorer_name if scorer_name is not None else mine
        want_setting = setting if setting is not None else self.setting
        flags = (f"--scorer {want_scorer} " if want_scorer else "") + f"--setting {want_setting}"
        raise ProfileError(
            f"the profile was calibrated with scorer {mine!r} in the {self.setting} setting but is used with "
            f"scorer {want_scorer!r} in the {want_setting} setting: calibrate one with `depthkv calibrate "
            f"{flags}`, or force its use (--force-profile, force_profile=True)"
        )

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path) -> None:
        """Write atomically: a crash never leaves a half-written profile behind. File options are written
        relative to ``path``'s folder."""
        folder = Path(path).resolve().parent
        data = self.data
        if (data.get("scorer") or {}).get("options"):
            options = _with_paths(data["scorer"]["options"],
                                  lambda p: os.path.relpath(Path(p).resolve(), folder))
            data = {**data, "scorer": {**data["scorer"], "options": options}}
        write_json(path, data, indent=1)

    @classmethod
    def load(cls, path: str | Path, identity: dict[str, Any] | None = None) -> Profile:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise ProfileError(f"{path} is not a JSON profile: {exc}") from exc
        if not isinstance(data, dict) or data.get("kind") != KIND:
            raise ProfileError(f"{path} is not a depthkv profile (kind {data.get('kind') if isinstance(data, dict) else None!r})")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ProfileError(f"{path} has profile schema {version}; this depthkv reads schema {SCHEMA_VERSION}")
        for key in ("model", "probe_ratios", "curves"):
            if key not in data:
                raise ProfileError(f"{path} lacks the field {key!r}")
        if data.get("setting", "aware") not in SETTINGS:
            raise ProfileError(f"{path} has setting {data.get('setting')!r}; expected one of: {', '.join(SETTINGS)}")
        if isinstance(data.get("scorer"), dict) and isinstance(data["scorer"].get("options"), dict):
            folder = Path(path).resolve().parent
            data["scorer"]["options"] = _with_paths(data["scorer"]["options"], lambda p: str((folder / p).resolve()))
        prof = cls(data)
        if identity is not None:
            prof.check_model(identity)
        return prof


def _with_paths(options: dict[str, Any], convert) -> dict[str, Any]:
    """``options`` with each string value of a ``FILE_OPTIONS`` key passed through ``convert``."""
    return {k: convert(v) if k in FILE_OPTIONS and isinstance(v, str) else v for k, v in options.items()}
