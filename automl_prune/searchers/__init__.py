"""Black-box searchers over per-group keep ratios, each an :class:`~automl_prune.strategy.AskTellStrategy`.

- :mod:`automl_prune.searchers.abc`: ``abc``, the artificial bee colony of ABCPruner
  (Lin et al., IJCAI 2020) on a discrete grid of keep levels;
- :mod:`automl_prune.searchers.optuna_search`: ``optuna``, Optuna's ask/tell interface
  with a TPE, CMA-ES, random or NSGA-II (accuracy versus cost) sampler;
- :mod:`automl_prune.searchers.global_pruning`: ``global``, global pruning as Torch-Pruning's
  ``global_pruning`` does it: one threshold on a criterion's normalised scores (``l1``), solved
  for the budget (one plan).

Modules are imported lazily by the strategy registry, so this package imports nothing.
"""
