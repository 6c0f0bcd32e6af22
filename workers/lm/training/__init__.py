"""Training that runs on the workers: device choice, objectives, loops, checkpoints."""
