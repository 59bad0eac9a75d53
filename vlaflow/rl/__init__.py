"""RL over the denoising chain: the chain as a policy, returns/GAE, PPO and IQL maths, DSRL's noise actor.

A layer between ``vlaflow.train`` (whose objectives use it) and ``vlaflow.policies`` (whose samplers it
drives): pure functions and small modules, no simulator and no training loop. See README.md.

- :mod:`~vlaflow.rl.chain`   -- stochastic chains with recorded steps, re-scoring, last-K' fine-tuning
- :mod:`~vlaflow.rl.returns` -- chunk-level rewards, gamma^Ta, GAE
- :mod:`~vlaflow.rl.ppo`     -- PPO-clip per denoising step with a denoising discount, value loss
- :mod:`~vlaflow.rl.iql`     -- expectile regression, double-Q IQL critic
- :mod:`~vlaflow.rl.dsrl`    -- SAC over the initial noise of a frozen denoiser
- :mod:`~vlaflow.rl.rollout` -- the vectorized-env protocol and on-policy chunk rollouts
- :mod:`~vlaflow.rl.gate`    -- RL-100's offline gate: MLP dynamics ensemble + value, imagined returns
"""
