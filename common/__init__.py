"""Code both programs use, written once: config loading, MQTT and TLS glue, ONNX
model loading and metadata, numerics, atomic files. Neither edge_node nor cloud_bridge imports the other.
"""
