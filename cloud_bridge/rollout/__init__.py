"""Canary rollouts driven from the registry: stages over the fleet, canary against
control on telemetry, promotion or rollback.
"""
