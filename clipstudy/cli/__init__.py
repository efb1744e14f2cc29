"""The command line: the dispatcher of ``python -m clipstudy`` and the train/evaluate commands."""
