"""The model store: content-addressed ONNX artifacts registered by name and version,
INT8 quantization with an accuracy budget, and lineage (where a retrained model came from).
"""
