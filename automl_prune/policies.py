"""Learned search policies saved with a run (``policy.pt``) and reused to start another search.

DDPG, PPO, REINFORCE and the skip-gate agent learn a policy while they search; the run
directory keeps it (``policy.pt``: the strategy's name, the model it was learned on, the
budget, and the networks' tensors, loadable with ``torch.load(..., weights_only=True)``).
``--search.init_policy RUN_DIR`` starts a new search of the same strategy from it (AMC's
transfer of a policy to another budget or a related model): the networks start from the
saved weights and DDPG skips its random warm-up unless ``search.ddpg.warmup_episodes`` says
otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from automl_prune.errors import InvalidValueError
from automl_prune.io import atomic_path

__all__ = ["POLICY_FILE", "load_policy", "policy_file", "save_policy"]

POLICY_FILE = "policy.pt"
_FORMAT = "automl-prune-policy"


def policy_file(source: str | Path) -> Path:
    """The policy file of a run directory (or the file itself)."""
    path = Path(source)
    return path / POLICY_FILE if path.is_dir() else path


def save_policy(run_dir: Path, strategy: str, state: dict[str, Any], about: dict[str, Any]) -> Path:
    """Write ``run_dir/policy.pt`` atomically.

    Args:
        run_dir: The run directory.
        strategy: Registry name of the strategy that learned it.
        state: The networks' tensors (:meth:`Strategy.policy_state`).
        about: Plain facts shown when it is reused (model, budget, evaluations).
    """
    path = run_dir / POLICY_FILE
    with atomic_path(path) as tmp:
        torch.save({"format": _FORMAT, "strategy": strategy, "about": about, "state": state}, tmp)
    return path


def load_policy(source: str | Path, strategy: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The saved policy of ``source`` (a run directory or its ``policy.pt``) for ``strategy``.

    Returns:
        (the networks' tensors, the facts saved with them).

    Raises:
        InvalidValueError: No policy there, not a policy file, or learned by another strategy.
    """
    path = policy_file(source)
    if not path.is_file():
        raise InvalidValueError(
            f"search.init_policy: no learned policy at '{path}'; give a run directory of a ddpg, ppo, reinforce "
            "or static_skip search (it holds policy.pt)"
        )
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same one-line error
        raise InvalidValueError(f"search.init_policy: '{path}' is not a policy saved by automl-prune ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        raise InvalidValueError(f"search.init_policy: '{path}' is not a policy saved by automl-prune")
    if data["strategy"] != strategy:
        raise InvalidValueError(
            f"search.init_policy: '{path}' was learned by {data['strategy']}, not {strategy}; "
            f"use --search.strategy {data['strategy']}"
        )
    return data["state"], dict(data.get("about", {}))
