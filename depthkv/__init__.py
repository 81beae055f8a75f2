"""depthkv: layer-dependent KV-cache pruning (DepthKV) for long-context LLMs.

    with depthkv.press(model, scorer="snapkv", ratio=0.6):
        model.generate(**inputs)
"""

__version__ = "0.1.0"

from depthkv.allocation.budgets import BudgetError, Budgets  # noqa: E402
from depthkv.engine import Press, Protection, kv_bytes, press, score_prefill  # noqa: E402

__all__ = ["BudgetError", "Budgets", "Press", "Protection", "__version__", "kv_bytes", "press", "score_prefill"]
