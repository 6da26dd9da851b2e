"""Code the tests share: oracles, models, trajectories, workers for other processes."""
