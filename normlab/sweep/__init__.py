"""Many runs: the grid and the sweep's driver (driver), the warm worker that trains runs
one after another on one device (worker), and where workers run: this process, local
processes, or Ray actors on a cluster (executors)."""
