"""Learned policies are saved with the run and start another search (AMC's transfer to a new budget)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cli_helpers import DIGITS_QUICK, cli

from automl_prune.envs.layer_prune import LayerPruneEnv
from automl_prune.errors import InvalidValueError
from automl_prune.evaluator import Evaluator, EvaluatorConfig
from automl_prune.policies import load_policy, save_policy
from automl_prune.search_spaces import SearchSpace
from automl_prune.strategy import make_strategy
from automl_prune.types import Budget


def _space(trained_cnn, fashion_small, flops: float) -> SearchSpace:
    evaluator = Evaluator(
        trained_cnn.model, fashion_small, Budget(flops=flops), EvaluatorConfig(eval_size=300, recalibration_batches=2)
    )
    return SearchSpace(evaluator)


def test_a_saved_ddpg_policy_loads_and_acts_at_another_budget(trained_cnn, fashion_small, tmp_path: Path) -> None:
    learner = make_strategy("ddpg", {"warmup_episodes": 3, "net_arch": [16, 16]})
    half = _space(trained_cnn, fashion_small, 0.5)
    learner.search(half.evaluator, half, 8, seed=0)
    save_policy(tmp_path, "ddpg", learner.policy_state(), {"model": "fashion_cnn"})
    state, about = load_policy(tmp_path, "ddpg")
    assert about == {"model": "fashion_cnn"}

    # what the learned actor does, deterministically, under the new budget
    space = _space(trained_cnn, fashion_small, 0.3)
    plans = []
    env = LayerPruneEnv(space, evaluate=lambda plan: plans.append(plan) or space.evaluator.evaluate(plan))
    obs, _ = env.reset(seed=0)
    done = False
    while not done:
        action, _ = learner.model.predict(obs, deterministic=True)
        obs, _, terminated, truncated, _ = env.step(action)
        done = terminated or truncated
    # a new agent started from the saved policy, without warm-up or noise, plays the same first episode
    follower = make_strategy("ddpg", {"net_arch": [16, 16], "noise_sigma": 0.0})
    follower.start_from(state)
    assert follower.schedule(10)[0] == 0  # no random warm-up once a policy is given
    result = follower.search(space.evaluator, space, 1, seed=5)
    assert result.history[0][0] == plans[0]
    fresh = make_strategy("ddpg", {"net_arch": [16, 16], "noise_sigma": 0.0, "warmup_episodes": 0})
    assert fresh.search(space.evaluator, space, 1, seed=5).history[0][0] != plans[0]  # the policy decides the plan
    assert space.evaluator.graph.flops_ratio(result.history[0][0]) <= 0.3 + 1e-9
    # networks of another size do not fit: one clear error
    other = make_strategy("ddpg", {"net_arch": [8]})
    other.start_from(state)
    with pytest.raises(InvalidValueError, match="does not fit"):
        other.search(space.evaluator, space, 1, seed=0)


@pytest.mark.parametrize("name", ["ppo", "reinforce"])
def test_other_agents_save_and_restore_their_policy(name: str, trained_cnn, fashion_small) -> None:
    space = _space(trained_cnn, fashion_small, 0.5)
    learner = make_strategy(name)
    learner.search(space.evaluator, space, 6, seed=0)
    state = learner.policy_state()
    follower = make_strategy(name)
    follower.start_from(state)
    follower.search(space.evaluator, space, 1, seed=1)  # one episode; PPO and REINFORCE update after more
    after = follower.policy_state()
    saved, loaded = state["policy"], after["policy"]  # weights untouched: no update after a single episode
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert make_strategy("random").policy_state() is None
    with pytest.raises(InvalidValueError, match="learns no policy"):
        make_strategy("abc").start_from(state)


def test_a_search_starts_from_a_run_directory_policy(tmp_path: Path) -> None:
    common = (*DIGITS_QUICK, "--search.strategy", "ddpg", "--search.only", "--search.refine_top", "0")
    first = tmp_path / "half"
    cli("search", *common, "--search.evaluations", "8", "--out", str(first))
    state, about = load_policy(first, "ddpg")
    assert about["evaluations"] == 8 and "flops" in about["budget"] and state["policy"]
    proc = cli(
        "-v",
        "search",
        *common,
        "--budget.flops",
        "0.3",
        "--search.evaluations",
        "4",
        "--search.init_policy",
        str(first),
        "--out",
        str(tmp_path / "third"),
    )
    assert f"ddpg starts from the policy of {first}" in proc.stderr
    assert "ddpg: 0 warm-up episodes" in proc.stderr
    assert (tmp_path / "third" / "policy.pt").is_file()
    # the wrong strategy, or a directory without a policy, is refused before any work
    proc = cli(
        "search",
        *DIGITS_QUICK,
        "--search.strategy",
        "reinforce",
        "--search.init_policy",
        str(first),
        "--out",
        str(tmp_path / "x"),
        check=False,
    )
    assert proc.returncode == 2 and "was learned by ddpg, not reinforce" in proc.stderr
    assert not (tmp_path / "x").exists()
    proc = cli("search", "--search.init_policy", str(tmp_path), "--out", str(tmp_path / "y"), check=False)
    assert proc.returncode == 2 and "no learned policy" in proc.stderr
    # a new run replacing the directory that holds its starting policy would delete it first: refused
    proc = cli("search", *common, "--search.init_policy", str(first), "--out", str(first), "--overwrite", check=False)
    assert proc.returncode == 2 and "--overwrite would delete" in proc.stderr
    assert load_policy(first, "ddpg")[1] == about  # the policy is still there
