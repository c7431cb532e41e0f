"""Drift per device and model version: scores of each telemetry window against a
baseline, hysteresis and cool-down in the registry, alerts published and stored.
"""
