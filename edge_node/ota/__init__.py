"""Model updates: signed commands checked by the guard, chunked resumable downloads,
A/B slots with a health check, probation and rollback.
"""
