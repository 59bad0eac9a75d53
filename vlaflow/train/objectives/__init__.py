"""What the one training loop learns: one small class per method (a batch source and a loss), each a
:class:`vlaflow.train.objective.Objective` (the contract and its defaults).

- :mod:`~vlaflow.train.objectives.bc` -- behaviour cloning on demonstration windows (``vlaflow train``)
- :mod:`~vlaflow.train.objectives.distill` -- one-step consistency distillation (``vlaflow distill``)

RL over the denoising chain (DPPO, RL-100, DSRL) and the world-model loss come here next; the loop's
docstring (:mod:`vlaflow.train.loop`) sketches how each plugs in.
"""
