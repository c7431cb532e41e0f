"""What bench/fleet.py needs around the simulator (the `fleetsim` package): the servers of a run
(servers.py), one run at one size (run.py), what it watches (watch.py: process CPU and run-queue
wait, registry lag, broker store, bridge status lines), its verdict and report (outcome.py) and the
operators' queries timed at fleet size (queries.py)."""
