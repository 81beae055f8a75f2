"""Recording where calibration questions look: the mean pre-RoPE query per layer and query head.

For every calibration item (question after the context, as in the ``agnostic`` setting) the context, question and
answer are prefilled once with the full cache; the post-RoPE queries of the question and answer tokens are
turned back into their pre-RoPE form (``question_prior.unrotate``) and averaged, first over the item's tokens,
then over the items (each item counts once, whatever its question's length). The result is what
``KVzip(question_weight=...)`` reads (``depthkv.scorers.question_prior``). It is its own pass, one prefill per item,
because a calibration with that option needs the finished directions before it scores its first sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from depthkv.calibration.ablation import CalibrationItem
from depthkv.engine import Protection, score_prefill
from depthkv.scorers.base import ScoreInputs, Scorer
from depthkv.scorers.question_prior import QuestionQueries, unrotate


@dataclass
class _QueryRecorder(Scorer):
    """Scores nothing (zeros); keeps each layer's mean pre-RoPE query [H, d] of the forward's last ``window``
    tokens."""

    window: int = 1
    means: dict[int, torch.Tensor] = field(default_factory=dict)
    name = "question_queries"

    def score(self, x: ScoreInputs) -> torch.Tensor:
        if x.inv_freq is None:
            raise ValueError("question queries need the model's RoPE frequencies (a rotary model)")
        query = x.query[0, :, -self.window:, :]  # [H, w, d]
        positions = x.positions[0, 0, -self.window:]
        self.means[x.layer_idx] = unrotate(query, positions[None, :], x.inv_freq).mean(dim=1).cpu()
        return torch.zeros(x.key.shape[:3], device=x.key.device)


@torch.no_grad()
def record_question_queries(model, items: Sequence[CalibrationItem], meta: dict | None = None,
                            protection: Protection | None = None, progress=None) -> QuestionQueries:
    """The mean pre-RoPE query of the question and answer tokens of ``items`` (agnostic items: the question
    follows the context), per layer and query head; ``meta`` is stored with it (model identity, data)."""
    if not items:
        raise ValueError("question queries need at least one calibration item")
    protection = protection or Protection(0, 0)
    total: torch.Tensor | None = None
    for i, item in enumerate(items):
        if item.question_ids is None:
            raise ValueError("question queries are taken with the question after the context: give items of the "
                             "agnostic setting")
        prefix, forced = item.split()
        recorder = _QueryRecorder(window=int(forced.shape[1]))
        score_prefill(model, torch.cat([prefix, forced], dim=1), [recorder], protection)
        if len(recorder.means) != model.config.num_hidden_layers:
            raise ValueError(f"recorded {len(recorder.means)} of {model.config.num_hidden_layers} layers' queries")
        table = torch.stack([recorder.means[layer] for layer in sorted(recorder.means)])  # [L, H, d]
        total = table if total is None else total + table
        if progress is not None:
            progress(i + 1, len(items))
    return QuestionQueries(total / len(items), dict(meta or {}, n_items=len(items)))
