"""One run: configuration, training loop, run state, checkpoints, records and evaluation."""
