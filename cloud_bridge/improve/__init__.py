"""The improvement loop: from labeled field samples to a better edge model on the drifted devices.

dataset version (cloud_bridge/samples/datasets.py) -> trainer (trainer.py, a pluggable program) ->
INT8 quantization + registration with lineage (lineage.py) -> evaluation gate (gate.py) -> canary
rollout (cloud_bridge/rollout) -> promoted or rolled back; driven by driver.py, state in store.py.
"""
