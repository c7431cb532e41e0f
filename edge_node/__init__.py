"""Edge node: the device daemon (ONNX inference, confidence routing, durable uplink)."""

__version__ = "0.1.0"
