"""Uncertain samples for labelers: the archive in the registry, exports to .npy/PNG
and Label Studio tasks, a live tail, and what comes back: human labels, pseudo-labels, dataset versions.
"""
