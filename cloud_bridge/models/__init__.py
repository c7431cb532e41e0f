"""The model store: content-addressed ONNX artifacts registered by name and version,
and INT8 quantization with an accuracy budget.
"""
