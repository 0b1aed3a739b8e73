"""Training: state and jitted steps, the loop, checkpoints, workdir, sharding, metrics,
health monitoring, preemption and the command line."""
