"""A training run: the trainer, its directory, checkpoints and resume."""
