"""automl-prune: search how to prune a neural network under a deployment budget."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
