"""Reinforcement-learning strategies.

- ``ddpg``: AMC's DDPG recipe on ``LayerPrune-v0`` (stable-baselines3), :mod:`.sb3`.
- ``ppo``: PPO on ``LayerPrune-v0`` (stable-baselines3), :mod:`.sb3`.
- ``reinforce``: N2N-style LSTM policies trained with REINFORCE, :mod:`.n2n`.
- ``skipnet``: policy gradient over residual-block skip gates on ``SkipGate-v0``, :mod:`.skipnet`.

The REINFORCE machinery both share (baseline, sampling, the episode loop) is :mod:`.policy_gradient`.

All are registered in :data:`automl_prune.strategy.STRATEGIES` and imported lazily.
"""
