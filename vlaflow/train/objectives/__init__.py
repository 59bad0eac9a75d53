"""What the one training loop learns: one small class per method (a batch source and a loss), each a
:class:`vlaflow.train.objective.Objective` (the contract and its defaults).

- :mod:`~vlaflow.train.objectives.bc` -- behaviour cloning on demonstration windows (``vlaflow train``)
- :mod:`~vlaflow.train.objectives.distill` -- one-step consistency distillation (``vlaflow distill``)

- :mod:`~vlaflow.train.objectives.dppo` -- PPO over the denoising chain in sim (``vlaflow refine``)
- :mod:`~vlaflow.train.objectives.dsrl` -- SAC on the initial noise of a frozen denoiser (``vlaflow refine``)
- :mod:`~vlaflow.train.objectives.rl100` -- RL-100's offline stage: the IQL critic, then PPO over the chain
  on store windows (``vlaflow refine --algo rl100``; the driver is :mod:`vlaflow.train.rl100`)

The loop's docstring (:mod:`vlaflow.train.loop`) sketches how each plugs in.
"""
