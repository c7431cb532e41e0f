"""Inputs to scores: micro-batches sized by measured cost, ONNX Runtime in a worker
thread off the event loop, and the pipeline that carries answers on to routing and the uplink.
"""
