"""automl-prune: search how to prune a neural network under a deployment budget.

``automl_prune.search(model, train_data, val_data, budget={"flops": 0.5})`` is the Python entry
point (:mod:`automl_prune.api`); ``automl-prune`` is the command line.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["PruningSearch", "__version__", "search"]


def __getattr__(name: str) -> Any:
    """``search`` and ``PruningSearch`` load torch on first use, not on ``import automl_prune``."""
    if name in ("search", "PruningSearch"):
        from automl_prune import api

        return getattr(api, name)
    raise AttributeError(f"module 'automl_prune' has no attribute {name!r}")
