"""The registry database (SQLite for one bridge, PostgreSQL for several): devices,
results, samples, drift state, models, commands and rollouts.
"""
