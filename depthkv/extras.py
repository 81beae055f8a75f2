"""Optional dependencies: plots and the ROUGE metric come with the ``eval`` extra.

The core install (``pip install depthkv``: calibrate, allocate, generate, compress/ask, and evaluation with
the exact-match metrics) needs neither matplotlib nor rouge-score. ``pip install 'depthkv[eval]'`` adds
them for PNG plots (``calibrate --plots``, ``allocate --plot``, ``report``, ``demo``, transfer matrices) and
for the summarisation task's ROUGE scores. Code that needs one imports it through :func:`require`, so a
missing package is one line naming the extra to install rather than a traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EVAL_EXTRA", "MissingExtraError", "pyplot", "require"]

EVAL_EXTRA = "eval"


class MissingExtraError(ImportError):
    """An optional package is not installed; the message names the extra that provides it."""


def require(module: str, feature: str, *, package: str | None = None, extra: str = EVAL_EXTRA) -> ModuleType:
    """Import ``module`` for ``feature`` or raise :class:`MissingExtraError` naming ``depthkv[extra]``.

    ``package`` is the name pip knows it by when it differs from the module (``rouge-score`` for
    ``rouge_score``).
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        name = package or module.partition(".")[0]
        raise MissingExtraError(
            f"{feature} needs the optional package {name!r}; install it with: pip install 'depthkv[{extra}]'"
        ) from None


def pyplot(feature: str = "plotting") -> ModuleType:
    """``matplotlib.pyplot`` on the headless Agg backend (depthkv only writes PNG files)."""
    matplotlib = require("matplotlib", feature)
    matplotlib.use("Agg")
    return require("matplotlib.pyplot", feature, package="matplotlib")
