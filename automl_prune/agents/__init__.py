"""Reinforcement-learning strategies.

- ``ddpg``: AMC's DDPG recipe on ``LayerPrune-v0`` (stable-baselines3), :mod:`.sb3`.
- ``ppo``: PPO on ``LayerPrune-v0`` (stable-baselines3), :mod:`.sb3`.
- ``reinforce``: N2N-style LSTM policies trained with REINFORCE, :mod:`.n2n`.
- ``static_skip``: SkipNet's recurrent gate over block-removal gates on ``SkipGate-v0`` (one pattern for
  every input), :mod:`.static_skip`; the per-input SkipNet is :mod:`automl_prune.dynamic`.

The REINFORCE machinery both share (baseline, sampling, the episode loop) is :mod:`.policy_gradient`.

All are registered in :data:`automl_prune.strategy.STRATEGIES` and imported lazily.
"""
