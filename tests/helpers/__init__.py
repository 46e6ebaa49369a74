"""What the tests share: paths, the offline shared-data environment, the tiny run, what a run
wrote, and a runner for `python -m pipeline.X` in a fresh process."""
