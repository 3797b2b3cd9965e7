"""The run package: the run folder, its files and locks, the units of work any engine can call, and the one-node job."""
