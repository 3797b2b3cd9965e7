"""The run package: the run folder and its records, the run graph and its one driver, the steps, the lock and claims, for every engine."""
