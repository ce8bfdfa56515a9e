"""Building a training job from a config and a task, and stepping it."""
