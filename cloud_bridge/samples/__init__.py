"""Uncertain samples for labelers: the archive in the registry, exports to .npy/PNG
and Label Studio tasks, and a live tail.
"""
