"""A frozen denoising policy steered by a DSRL noise actor, as one loadable policy family (``steered``)."""
