"""What the benchmarks in bench/ share, kept out of bench/ so that every script there is a benchmark
that ends with its ratio line: the servers of a fleet run (servers.py), one run at one size (run.py),
what it watches (watch.py: process CPU and run-queue wait, registry lag, broker store, bridge status
lines), the same-backlog drain of two bridges against one (drain.py), its verdict and report
(outcome.py), the operators' queries timed at fleet size (queries.py), and registry rows written
with the bridge's own code for the query benchmarks (queryfill.py, typed.py)."""
