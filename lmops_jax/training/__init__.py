"""Training: the `train` job and API, the Trainer and its jitted step, train state, optimizers,
metrics. Imports models, data, losses, partitioning and checkpoints; nothing below imports it."""
