"""Stable-Baselines3 agents on ``LayerPrune-v0``: AMC's DDPG recipe and a PPO alternative.

Both strategies build a :class:`~automl_prune.envs.layer_prune.LayerPruneEnv` whose
episodes call the session's :meth:`~automl_prune.strategy.SearchSession.evaluate`, so
every finished episode is one counted evaluation, and let SB3 learn until the evaluation
budget is spent (a callback stops ``learn`` right after the last allowed evaluation). The
search result (best feasible plan, history) is built by the :class:`Strategy` base class.

AMC (He et al., ECCV 2018) trains DDPG with: warm-up episodes of uniformly random actions;
afterwards the actor's action perturbed by a truncated normal whose width decays by a
constant factor per episode; the episode's final reward given to *every* transition of the
episode; a moving-average baseline subtracted from sampled rewards; ``gamma = 1``; one
gradient step per stored transition; small 300-300 actor and critic networks. What SB3 can
and cannot express of that recipe is listed in :class:`DDPGStrategy`'s docstring.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3 import DDPG, PPO
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.noise import ActionNoise
from stable_baselines3.common.type_aliases import ReplayBufferSamples
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv
from stable_baselines3.common.vec_env.base_vec_env import VecEnvStepReturn

from automl_prune.envs.layer_prune import LayerPruneEnv
from automl_prune.errors import InvalidValueError
from automl_prune.seeding import derive_seed
from automl_prune.strategy import EvaluationBudgetExhausted, SearchSession, Strategy

logger = logging.getLogger(__name__)

__all__ = [
    "BatchedEvaluationVecEnv",
    "DDPGStrategy",
    "DecayingTruncatedNormalNoise",
    "EpisodeRewardReplayBuffer",
    "PPOStrategy",
    "StopWhenBudgetSpent",
]

_MAX_REJECTION_ROUNDS = 1000


WARMUP_SHARE = 0.25
"""Default DDPG warm-up as a share of the evaluation budget (AMC: 100 random episodes of 400)."""
FINAL_NOISE = 0.05
"""Default DDPG noise width at the last episode, relative to the initial width."""


# ---------------------------------------------------------------------------- exploration noise
class DecayingTruncatedNormalNoise(ActionNoise):
    """AMC's exploration noise: a normal truncated to the action bounds, narrowing every episode.

    The standard deviation is ``sigma * decay ** max(0, episodes - delay)``, where
    ``episodes`` counts the calls of :meth:`reset` (SB3's off-policy algorithms call
    ``action_noise.reset()`` once at the end of every episode) and ``delay`` is the number
    of episodes before the decay starts (AMC counts from the end of its warm-up).

    :meth:`sample` is AMC's form: a draw from ``N(mean, std^2)`` truncated to
    ``[low, high]`` (rejection sampling, so the density is the truncated normal's, not a
    clipped normal with mass piled on the bounds). :meth:`__call__`, the plain SB3
    interface, returns zero-mean noise truncated to ``[low, high]``, which SB3 adds to the
    action and clips; :class:`DDPGStrategy` uses :meth:`sample` around the actor's action.

    Args:
        sigma: Initial standard deviation, in action units.
        decay: Factor applied to the standard deviation per episode, in ``(0, 1]``.
        low: Lower action bound.
        high: Upper action bound.
        size: Action dimension.
        delay: Episodes (resets) before the decay starts.
        seed: Seed of the noise's own generator.
        dtype: Dtype of the returned samples.

    Raises:
        InvalidValueError: For a negative ``sigma``, a ``decay`` outside ``(0, 1]``,
            ``low >= high``, ``size < 1`` or a negative ``delay``.
    """

    def __init__(
        self,
        sigma: float = 1.0,
        decay: float = 0.95,
        low: float = -1.0,
        high: float = 1.0,
        size: int = 1,
        delay: int = 0,
        seed: int | None = None,
        dtype: type[np.floating] = np.float32,
    ):
        if sigma < 0:
            raise InvalidValueError(f"noise sigma must be >= 0, got {sigma}")
        if not 0.0 < decay <= 1.0:
            raise InvalidValueError(f"noise decay must be in (0, 1], got {decay}")
        if not low < high:
            raise InvalidValueError(f"noise bounds must satisfy low < high, got [{low}, {high}]")
        if size < 1 or delay < 0:
            raise InvalidValueError(f"noise size must be >= 1 and delay >= 0, got size={size}, delay={delay}")
        super().__init__()
        self.initial_sigma = float(sigma)
        self.decay = float(decay)
        self.low = float(low)
        self.high = float(high)
        self.size = int(size)
        self.delay = int(delay)
        self.dtype = dtype
        self.episodes = 0
        self._rng = np.random.default_rng(seed)

    @property
    def sigma(self) -> float:
        """The current standard deviation."""
        return self.initial_sigma * self.decay ** max(0, self.episodes - self.delay)

    def reset(self) -> None:
        """End of an episode: count it (the standard deviation decays from the next episode on)."""
        self.episodes += 1

    def sample(self, mean: np.ndarray | float) -> np.ndarray:
        """Draw from ``N(mean, sigma^2)`` truncated to ``[low, high]``, element-wise.

        Args:
            mean: Centre of the distribution (clipped into the bounds first); any shape.

        Returns:
            An array of ``mean``'s shape, inside ``[low, high]``.
        """
        centre = np.clip(np.asarray(mean, dtype=np.float64), self.low, self.high)
        sigma = self.sigma
        if sigma == 0.0:
            return centre.astype(self.dtype)
        out = centre.copy()
        pending = np.ones(centre.shape, dtype=bool)
        for _ in range(_MAX_REJECTION_ROUNDS):
            draw = self._rng.normal(centre, sigma)
            accepted = pending & (draw >= self.low) & (draw <= self.high)
            out[accepted] = draw[accepted]
            pending &= ~accepted
            if not pending.any():
                break
        else:  # only for a sigma far wider than the bounds, where the truncated normal is ~uniform
            out[pending] = self._rng.uniform(self.low, self.high, size=int(pending.sum()))
        return out.astype(self.dtype)

    def __call__(self) -> np.ndarray:
        """Zero-mean noise of shape ``(size,)`` truncated to ``[low, high]`` (SB3's additive interface)."""
        return self.sample(np.zeros(self.size))

    def __repr__(self) -> str:
        return (
            f"DecayingTruncatedNormalNoise(sigma={self.initial_sigma}, decay={self.decay}, "
            f"bounds=[{self.low}, {self.high}], delay={self.delay}, episodes={self.episodes})"
        )


# ---------------------------------------------------------------------------- replay buffer
class EpisodeRewardReplayBuffer(ReplayBuffer):
    """A replay buffer that gives each transition its episode's final reward and baselines samples.

    With ``final_reward_to_all`` the transitions of the running episode are held back and
    written when the episode ends, each with the episode's last reward (AMC's
    ``agent.observe(final_reward, ...)`` for every step of the trajectory). This is exact
    online as long as training only happens at episode ends (``train_freq`` in episodes).
    With ``baseline_alpha`` every :meth:`sample` updates a moving average of the sampled
    batches' mean reward (``b += alpha * (mean - b)``, initialised with the first batch's
    mean) and subtracts it from the batch's rewards, as AMC's DDPG update does.

    Args:
        buffer_size: Capacity in transitions.
        observation_space: Observation space.
        action_space: Action space.
        device: Torch device of sampled tensors.
        n_envs: Number of parallel envs; must be 1 (episodes are buffered per env).
        optimize_memory_usage: SB3's memory-saving layout (not supported with buffering).
        handle_timeout_termination: SB3's timeout handling.
        final_reward_to_all: Give every transition the episode's final reward.
        baseline_alpha: Step size of the moving-average baseline; ``None`` disables it.

    Attributes:
        moving_average: Current baseline (``None`` before the first sample).

    Raises:
        InvalidValueError: For ``n_envs != 1`` with ``final_reward_to_all``, or an
            ``baseline_alpha`` outside ``(0, 1]``.
    """

    def __init__(
        self,
        buffer_size: int,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        device: torch.device | str = "auto",
        n_envs: int = 1,
        optimize_memory_usage: bool = False,
        handle_timeout_termination: bool = True,
        final_reward_to_all: bool = True,
        baseline_alpha: float | None = 0.5,
    ):
        if final_reward_to_all and (n_envs != 1 or optimize_memory_usage):
            raise InvalidValueError("final_reward_to_all needs a single env and optimize_memory_usage=False")
        if baseline_alpha is not None and not 0.0 < baseline_alpha <= 1.0:
            raise InvalidValueError(f"baseline_alpha must be in (0, 1] or None, got {baseline_alpha}")
        super().__init__(
            buffer_size,
            observation_space,
            action_space,
            device=device,
            n_envs=n_envs,
            optimize_memory_usage=optimize_memory_usage,
            handle_timeout_termination=handle_timeout_termination,
        )
        self.final_reward_to_all = final_reward_to_all
        self.baseline_alpha = baseline_alpha
        self.moving_average: float | None = None
        self._episode: list[
            tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[dict[str, Any]]]
        ] = []

    def add(
        self,
        obs: np.ndarray,
        next_obs: np.ndarray,
        action: np.ndarray,
        reward: np.ndarray,
        done: np.ndarray,
        infos: list[dict[str, Any]],
    ) -> None:
        """Store a transition (held back until the episode ends with ``final_reward_to_all``)."""
        if not self.final_reward_to_all:
            super().add(obs, next_obs, action, reward, done, infos)
            return
        self._episode.append(
            (
                np.array(obs, copy=True),
                np.array(next_obs, copy=True),
                np.array(action, copy=True),
                np.array(reward, copy=True),
                np.array(done, copy=True),
                infos,
            )
        )
        if bool(np.asarray(done).reshape(-1)[0]):
            final = np.array(reward, copy=True)
            for o, o2, a, _, d, info in self._episode:
                super().add(o, o2, a, final, d, info)
            self._episode = []

    @property
    def pending(self) -> int:
        """Transitions of the running episode not yet written."""
        return len(self._episode)

    def sample(self, batch_size: int, env: Any = None) -> ReplayBufferSamples:
        """A random batch, with the moving-average baseline subtracted from its rewards."""
        batch = super().sample(batch_size, env=env)
        if self.baseline_alpha is None:
            return batch
        mean = float(batch.rewards.mean().item())
        if self.moving_average is None:
            self.moving_average = mean
        else:
            self.moving_average += self.baseline_alpha * (mean - self.moving_average)
        return batch._replace(rewards=batch.rewards - self.moving_average)


# ---------------------------------------------------------------------------- SB3 plumbing
class BatchedEvaluationVecEnv(DummyVecEnv):
    """Several ``LayerPrune-v0`` envs stepped together whose finished plans are scored as one batch.

    Each env defers its evaluation (``defer_evaluation=True``); after every vector step the
    plans finished in that step go to ``evaluate_many`` together (the session's, so on Ray
    workers when the search has them) and their rewards are filled in. The envs start
    together and every episode has one step per group, so all of them finish in the same
    step: one rollout of ``num_envs`` episodes costs one parallel batch of evaluations.

    Args:
        space: The search space.
        n_envs: Number of envs.
        evaluate_many: Scores a list of plans (it may score fewer than given when the
            budget runs out: the search then ends with
            :class:`~automl_prune.strategy.EvaluationBudgetExhausted`).

    Raises:
        InvalidValueError: For ``n_envs < 1``.
    """

    def __init__(self, space: Any, n_envs: int, evaluate_many: Any):
        if n_envs < 1:
            raise InvalidValueError(f"n_envs must be >= 1, got {n_envs}")
        super().__init__([lambda: LayerPruneEnv(space, defer_evaluation=True) for _ in range(n_envs)])
        self.evaluate_many = evaluate_many

    def step_wait(self) -> VecEnvStepReturn:
        """Step every env, then score the plans finished in this step as one batch."""
        obs, rewards, dones, infos = super().step_wait()
        pending = [i for i, info in enumerate(infos) if info.get("pending")]
        if pending:
            evaluations = self.evaluate_many([infos[i]["plan"] for i in pending])
            for i, evaluation in zip(pending, evaluations):
                rewards[i] = float(evaluation.reward)
                infos[i]["evaluation"] = evaluation
                infos[i]["pending"] = False
            if len(evaluations) < len(pending):
                raise EvaluationBudgetExhausted
        return obs, rewards, dones, infos


class StopWhenBudgetSpent(BaseCallback):
    """Stops ``learn`` right after the step that spent the session's last evaluation.

    Args:
        session: The search session whose budget is watched.
    """

    def __init__(self, session: SearchSession):
        super().__init__(verbose=0)
        self.session = session

    def _on_step(self) -> bool:
        return not self.session.exhausted


class _AMCDDPG(DDPG):
    """SB3 DDPG with AMC's exploration and separate actor / critic learning rates.

    - Warm-up (``num_timesteps < learning_starts``): uniformly random actions, no noise.
    - Afterwards: the actor's action, perturbed by ``action_noise.sample(action)`` when the
      noise is a :class:`DecayingTruncatedNormalNoise` (truncated normal around the action),
      else SB3's additive-and-clip.
    - The critic's optimiser runs at ``critic_learning_rate``; the actor's at ``learning_rate``.
    """

    def __init__(self, *args: Any, critic_learning_rate: float = 1e-3, **kwargs: Any):
        self.critic_learning_rate = critic_learning_rate
        super().__init__(*args, **kwargs)

    def _update_learning_rate(self, optimizers: list[torch.optim.Optimizer] | torch.optim.Optimizer) -> None:
        """SB3's schedule for both optimisers (the actor's rate), then the critic's own rate."""
        super()._update_learning_rate(optimizers)
        for group in self.critic.optimizer.param_groups:
            group["lr"] = self.critic_learning_rate

    def _sample_action(
        self, learning_starts: int, action_noise: ActionNoise | None = None, n_envs: int = 1
    ) -> tuple[np.ndarray, np.ndarray]:
        """(action for the env, action stored in the buffer); the same here, as the Box is [-1, 1]."""
        if self.num_timesteps < learning_starts:
            unscaled = np.array([self.action_space.sample() for _ in range(n_envs)])
            scaled = self.policy.scale_action(unscaled)
        else:
            assert self._last_obs is not None, "self._last_obs was not set"
            unscaled, _ = self.predict(self._last_obs, deterministic=True)
            scaled = self.policy.scale_action(unscaled)
            if isinstance(action_noise, DecayingTruncatedNormalNoise):
                scaled = action_noise.sample(scaled)
            elif action_noise is not None:
                scaled = np.clip(scaled + action_noise(), -1.0, 1.0)
        return self.policy.unscale_action(scaled), scaled


class _SB3Strategy(Strategy):
    """Shared loop: build the env and the model, learn until the evaluation budget is spent.

    Attributes:
        model: The SB3 model of the last search (``None`` before the first).
    """

    learns_policy = True

    def __init__(self) -> None:
        self.model: BaseAlgorithm | None = None

    def policy_state(self) -> dict[str, Any] | None:
        """The SB3 model's parameters (networks and optimisers) after the last search."""
        return None if self.model is None else self.model.get_parameters()

    def _build(self, env: LayerPruneEnv | VecEnv, session: SearchSession, n_groups: int) -> BaseAlgorithm:
        """The SB3 model to train on ``env`` (seeded with ``session.seed``)."""
        raise NotImplementedError(f"{type(self).__name__} must implement _build")

    def _env(self, session: SearchSession) -> LayerPruneEnv | VecEnv:
        """The environment to learn on: one env scoring each episode through the session."""
        # SB3 wraps a plain env (Monitor, DummyVecEnv) and, given ``seed``, seeds its reset and action space.
        return LayerPruneEnv(session.space, evaluate=session.evaluate)

    def _run(self, session: SearchSession) -> None:
        n_groups = session.space.dim
        model = self._build(self._env(session), session, n_groups)
        # No SB3 log outputs (its default logger makes an empty SB3-<date> folder in /tmp per learn()).
        model.set_logger(Logger(folder=None, output_formats=[]))
        if self.initial_policy is not None:
            try:
                model.set_parameters(self.initial_policy, exact_match=True)
            except (RuntimeError, ValueError, KeyError) as exc:
                raise InvalidValueError(
                    f"search.init_policy does not fit this {self.name or type(self).__name__} agent (other network "
                    f"sizes or observations?): {str(exc).splitlines()[0]}"
                ) from None
            logger.info("%s: starting from the given policy", type(self).__name__)
        self.model = model
        stop = StopWhenBudgetSpent(session)
        logger.info(
            "%s: learning on %d groups until %d evaluations are spent", type(self).__name__, n_groups, session.remaining
        )
        first = True
        try:
            while not session.exhausted:
                used = session.used
                # One episode per evaluation; one episode of margin.
                model.learn(
                    total_timesteps=(session.remaining + 1) * n_groups,
                    callback=stop,
                    reset_num_timesteps=first,
                    progress_bar=False,
                )
                first = False
                if session.used == used:
                    logger.warning("%s: learn() spent no evaluation; stopping early", type(self).__name__)
                    break
        except EvaluationBudgetExhausted:
            logger.debug("%s: evaluation budget exhausted inside env.step", type(self).__name__)
        finally:
            vec_env = model.get_env()
            if vec_env is not None:
                vec_env.close()
        logger.info(
            "%s: done after %d timesteps, %d evaluations", type(self).__name__, model.num_timesteps, session.used
        )


# ---------------------------------------------------------------------------- strategies
class DDPGStrategy(_SB3Strategy):
    """AMC's DDPG agent (He et al., ECCV 2018) with Stable-Baselines3.

    What follows AMC's recipe:

    - Warm-up: the first ``warmup_episodes`` episodes take uniformly random actions and no
      gradient step is taken (SB3 ``learning_starts = warmup_episodes * n_groups``).
    - Exploration: afterwards the actor's action is perturbed by a truncated normal
      (:class:`DecayingTruncatedNormalNoise`) whose width decays by ``noise_decay`` per
      episode counted from the end of the warm-up. AMC's 0.5 is on its ``[0, 1]`` action
      scale; the env's actions are in ``[-1, 1]``, so the same width is ``noise_sigma = 1.0``.
    - Rewards: the episode's final reward is given to every transition of the episode and a
      moving-average baseline of the sampled batches' mean reward is subtracted
      (:class:`EpisodeRewardReplayBuffer`). This is exact, not an approximation: the buffer
      holds an episode back until it ends, and training only happens at episode ends.
    - ``gamma = 1``, ``tau = 0.01``, batch 64, actor / critic learning rates 1e-4 / 1e-3,
      300-300 hidden layers, one gradient step per transition of the episode just ended
      (``gradient_steps=-1``), a replay buffer of ``buffer_episodes`` episodes (AMC: 100
      transitions per layer).

    Where this differs from AMC:

    - SB3's networks: the critic concatenates state and action at its input (AMC sums
      separate state and action projections); the last layers use PyTorch's default
      initialisation (AMC draws them from ``U(-0.003, 0.003)``); the actor ends in ``tanh``
      on ``[-1, 1]`` instead of a sigmoid on ``[0, 1]`` (an affine reparametrisation).
    - Warm-up length and noise decay scale with the evaluation budget: AMC takes 100 random
      episodes of its 400 and decays its noise by 0.95 per episode; by default the warm-up
      here is :data:`WARMUP_SHARE` of the budget (at least 2 episodes, and at least one episode
      left to learn from) and the decay brings the noise to :data:`FINAL_NOISE` of its initial
      width by the last episode, so a 100-evaluation search explores as long, relatively, as
      AMC's 400-episode one. Give ``warmup_episodes`` / ``noise_decay`` to fix them.
    - With ``gamma = 1`` and the final reward on every transition, the critic's target for
      step ``t`` sums the (baselined) reward over the remaining steps, i.e. it scales with
      the steps left; this is what AMC's update does too and leaves the greedy action of
      each state unchanged.

    Evaluations run one at a time: AMC's update follows every episode, so each episode acts
    with the actor trained on all the episodes before it (several rollout envs would act with
    a stale actor and need step-based training, which breaks the per-episode reward above).

    Args:
        warmup_episodes: Episodes of random actions before learning starts (None: a share of
            the evaluation budget, see above).
        noise_sigma: Initial standard deviation of the exploration noise, in ``[-1, 1]`` action units.
        noise_decay: Per-episode decay factor of the noise's standard deviation (None: scaled
            to the budget, see above).
        actor_learning_rate: Adam learning rate of the actor.
        critic_learning_rate: Adam learning rate of the critic.
        tau: Soft update coefficient of the target networks.
        gamma: Discount factor.
        batch_size: Minibatch size of a gradient step.
        buffer_episodes: Replay buffer capacity in episodes (times the number of groups = transitions).
        gradient_steps: Gradient steps after each episode; ``-1`` = one per transition (AMC).
        net_arch: Hidden layer sizes of both the actor and the critic.
        final_reward_to_all: Give every transition the episode's final reward (AMC); if
            False, only the last step is rewarded.
        baseline_alpha: Step size of the moving-average reward baseline; ``None`` disables it.
        device: Torch device of the networks.

    Raises:
        InvalidValueError: For a negative ``warmup_episodes``, ``batch_size`` or
            ``buffer_episodes`` below 1, or an invalid noise or baseline setting.
    """

    sequential_reason = (
        "AMC's DDPG updates its actor after every episode, so each episode's plan is scored before the next is chosen"
    )

    def __init__(
        self,
        warmup_episodes: int | None = None,
        noise_sigma: float = 1.0,
        noise_decay: float | None = None,
        actor_learning_rate: float = 1e-4,
        critic_learning_rate: float = 1e-3,
        tau: float = 0.01,
        gamma: float = 1.0,
        batch_size: int = 64,
        buffer_episodes: int = 100,
        gradient_steps: int = -1,
        net_arch: Sequence[int] = (300, 300),
        final_reward_to_all: bool = True,
        baseline_alpha: float | None = 0.5,
        device: str = "cpu",
    ):
        super().__init__()
        if warmup_episodes is not None and warmup_episodes < 0:
            raise InvalidValueError(f"warmup_episodes must be >= 0, got {warmup_episodes}")
        if batch_size < 1 or buffer_episodes < 1:
            raise InvalidValueError(f"batch_size and buffer_episodes must be >= 1, got {batch_size}, {buffer_episodes}")
        if noise_sigma < 0 or (noise_decay is not None and not 0.0 < noise_decay <= 1.0):
            raise InvalidValueError(
                f"noise_sigma must be >= 0 and noise_decay in (0, 1], got {noise_sigma}, {noise_decay}"
            )
        if baseline_alpha is not None and not 0.0 < baseline_alpha <= 1.0:
            raise InvalidValueError(f"baseline_alpha must be in (0, 1] or None, got {baseline_alpha}")
        self.warmup_episodes = warmup_episodes
        self.noise_sigma = noise_sigma
        self.noise_decay = noise_decay
        self.actor_learning_rate = actor_learning_rate
        self.critic_learning_rate = critic_learning_rate
        self.tau = tau
        self.gamma = gamma
        self.batch_size = batch_size
        self.buffer_episodes = buffer_episodes
        self.gradient_steps = gradient_steps
        self.net_arch = list(net_arch)
        self.final_reward_to_all = final_reward_to_all
        self.baseline_alpha = baseline_alpha
        self.device = device
        self.noise: DecayingTruncatedNormalNoise | None = None
        self.warmup = 0
        self.decay = 1.0

    def schedule(self, episodes: int) -> tuple[int, float]:
        """(warm-up episodes, per-episode noise decay) for a search of ``episodes`` episodes."""
        warmup = self.warmup_episodes
        if warmup is None and self.initial_policy is not None:
            warmup = 0  # a learned policy acts from the first episode (its noise still explores)
        if warmup is None:
            warmup = min(max(2, round(WARMUP_SHARE * episodes)), max(0, episodes - 1))
        decay = self.noise_decay
        if decay is None:
            decay = FINAL_NOISE ** (1.0 / max(1, episodes - warmup))
        return warmup, decay

    def _build(self, env: LayerPruneEnv, session: SearchSession, n_groups: int) -> BaseAlgorithm:
        # SB3 resets the noise once when learn() starts (BaseAlgorithm._setup_learn) and then at
        # every episode end, so during episode e (0-based) it has been reset e + 1 times: a delay
        # of warmup + 1 gives the first episode after the warm-up the initial sigma, as in AMC.
        self.warmup, self.decay = self.schedule(session.max_evaluations)
        logger.info("ddpg: %d warm-up episodes, noise decay %.4f per episode", self.warmup, self.decay)
        self.noise = DecayingTruncatedNormalNoise(
            sigma=self.noise_sigma,
            decay=self.decay,
            size=1,
            delay=self.warmup + 1,
            seed=derive_seed(session.seed, "ddpg-noise"),
        )
        return _AMCDDPG(
            "MlpPolicy",
            env,
            learning_rate=self.actor_learning_rate,
            critic_learning_rate=self.critic_learning_rate,
            buffer_size=self.buffer_episodes * n_groups,
            learning_starts=self.warmup * n_groups,
            batch_size=self.batch_size,
            tau=self.tau,
            gamma=self.gamma,
            train_freq=(1, "episode"),
            gradient_steps=self.gradient_steps,
            action_noise=self.noise,
            replay_buffer_class=EpisodeRewardReplayBuffer,
            replay_buffer_kwargs={
                "final_reward_to_all": self.final_reward_to_all,
                "baseline_alpha": self.baseline_alpha,
            },
            policy_kwargs={"net_arch": list(self.net_arch)},
            seed=session.seed,
            device=self.device,
            verbose=0,
        )


class PPOStrategy(_SB3Strategy):
    """Stable-Baselines3 PPO on ``LayerPrune-v0``: an on-policy alternative to AMC's DDPG.

    A rollout is ``episodes_per_rollout`` whole episodes, run side by side in as many envs of a
    :class:`BatchedEvaluationVecEnv`: their plans are scored as one batch, in parallel on
    the search's Ray workers when it has them (the rollout, and so the search, is the same
    whatever the number of workers). After each rollout PPO takes ``n_epochs`` passes of
    minibatch updates.
    ``gamma = 1``: only the episode's final reward matters. The Gaussian policy's own
    sampling explores (no action noise); advantages come from GAE with a learned value
    function and are normalised per minibatch, which plays the part of AMC's reward
    baseline.

    Args:
        episodes_per_rollout: Episodes collected between two updates.
        learning_rate: Adam learning rate (policy and value function).
        batch_size: Minibatch size; ``None`` = half a rollout (two minibatches per epoch).
        n_epochs: Passes over each rollout.
        gamma: Discount factor.
        gae_lambda: GAE's bias / variance trade-off (1 = Monte-Carlo returns).
        clip_range: PPO's clipping parameter.
        ent_coef: Entropy bonus coefficient.
        net_arch: Hidden layer sizes of the policy and the value networks.
        device: Torch device of the networks.

    Raises:
        InvalidValueError: For ``episodes_per_rollout``, ``batch_size`` or ``n_epochs`` below 1
            (``batch_size`` below 2 breaks advantage normalisation).
    """

    def __init__(
        self,
        episodes_per_rollout: int = 4,
        learning_rate: float = 3e-4,
        batch_size: int | None = None,
        n_epochs: int = 10,
        gamma: float = 1.0,
        gae_lambda: float = 0.95,
        clip_range: float = 0.2,
        ent_coef: float = 0.0,
        net_arch: Sequence[int] = (64, 64),
        device: str = "cpu",
    ):
        super().__init__()
        if episodes_per_rollout < 1 or n_epochs < 1:
            raise InvalidValueError(
                f"episodes_per_rollout and n_epochs must be >= 1, got {episodes_per_rollout}, {n_epochs}"
            )
        if batch_size is not None and batch_size < 2:
            raise InvalidValueError(
                f"batch_size must be >= 2 (advantages are normalised per minibatch), got {batch_size}"
            )
        self.episodes_per_rollout = episodes_per_rollout
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.n_epochs = n_epochs
        self.gamma = gamma
        self.gae_lambda = gae_lambda
        self.clip_range = clip_range
        self.ent_coef = ent_coef
        self.net_arch = list(net_arch)
        self.device = device

    def _env(self, session: SearchSession) -> VecEnv:
        """``episodes_per_rollout`` envs whose finished plans are scored together."""
        return BatchedEvaluationVecEnv(session.space, self.episodes_per_rollout, session.evaluate_many)

    def _build(self, env: LayerPruneEnv | VecEnv, session: SearchSession, n_groups: int) -> BaseAlgorithm:
        # One episode per env per rollout; whole episodes, and a rollout of at least two steps
        # (SB3 needs n_steps * n_envs > 1).
        n_envs = env.num_envs if isinstance(env, VecEnv) else 1
        n_steps = math.ceil(2 / (n_groups * n_envs)) * n_groups
        rollout = n_steps * n_envs
        batch_size = min(self.batch_size if self.batch_size is not None else max(2, rollout // 2), rollout)
        return PPO(
            "MlpPolicy",
            env,
            learning_rate=self.learning_rate,
            n_steps=n_steps,
            batch_size=batch_size,
            n_epochs=self.n_epochs,
            gamma=self.gamma,
            gae_lambda=self.gae_lambda,
            clip_range=self.clip_range,
            ent_coef=self.ent_coef,
            policy_kwargs={"net_arch": list(self.net_arch)},
            seed=session.seed,
            device=self.device,
            verbose=0,
        )
