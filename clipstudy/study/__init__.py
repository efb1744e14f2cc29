"""The study over many runs: cells, the sweep and its executors, tuning, the report and its findings."""
