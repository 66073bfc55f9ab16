"""Measures. Each module has `run(config, job) -> Result` (in the job's process, where it may
load a backend) and `summarize(records) -> Summary` (in the parent, from records alone)."""
